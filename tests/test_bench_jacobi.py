"""bench/jacobi.py keeps working: a tiny model is trained and cached, and every solver it times samples."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import jacobi  # noqa: E402


def test_jacobi_bench_trains_caches_and_runs_every_solver(tmp_path, monkeypatch):
    monkeypatch.setattr(jacobi, "OUT", tmp_path)
    tiny = dict(jacobi.CONFIGS["quick"], flow=dict(jacobi.CONFIGS["quick"]["flow"], image_size=8), train_steps=3,
                train_batch=4)
    monkeypatch.setitem(jacobi.CONFIGS, "tiny", tiny)
    model = jacobi.trained_model("tiny")
    assert len(list(tmp_path.glob("jacobi_tiny_*.pt"))) == 1
    assert any(p.abs().sum() > 0 for blk in model.blocks for p in blk.proj_out.parameters())  # it did train
    gs, metrics = jacobi.plan(model, 8, tiny)
    assert len(metrics) == 2 and gs.method == "gs_jacobi"
    for solver in (jacobi.Solver(), jacobi.Solver("jacobi", tol=1e-4, max_iters=64), gs,
                   jacobi.Solver("gs_jacobi", tol=1e-4, window=16, max_iters=16)):
        x = jacobi.setup_speed("tiny", solver.to_dict(), batch=2)()
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
