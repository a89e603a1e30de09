"""bench/train.py runs end to end and its table holds sane numbers: positive times and rates, MFU in (0, 1), and a
FLOP count that includes the backward pass (at least 6 x weights x tokens x batch)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train as bench_train  # noqa: E402


@pytest.fixture
def tiny_config():
    quick = bench_train.CONFIGS["quick"]
    bench_train.CONFIGS["tiny"] = dict(quick, flow=dict(quick["flow"], image_size=8), batch=4, sample_batch=4)
    yield "tiny"
    del bench_train.CONFIGS["tiny"]


def test_train_bench_table(tiny_config, capsys):
    """Read from the rows main() returns (full precision), not the printed table: a busy machine rounds a tiny
    model's TFLOP/s to 0.0000 there."""
    rows = bench_train.main(["--config", tiny_config, "--device", "cpu", "--repeat", "1"])
    assert [r["case"] for r in rows] == ["TARFlow baseline", "R-REPA 7&8", "sampling, KV cache"]
    for r in rows:
        assert r["seconds"] > 0 and r["images_per_second"] > 0 and r["flops"] > 0 and r["tflops"] > 0, r
        assert 0 < r["mfu"] < 1, r
        assert abs(r["images_per_second"] - r["images"] / r["seconds"]) <= 1e-9 * r["images_per_second"]
    assert rows[2].get("sampling") and not rows[0].get("sampling")  # the sampling row prints hours for 50K images
    assert "| sampling, KV cache |" in capsys.readouterr().out

    cfg = bench_train.FlowConfig(**bench_train.CONFIGS[tiny_config]["flow"])
    base, rrepa = rows[0], rows[1]
    six_n = 6 * bench_train.linear_params(cfg) * cfg.num_tokens * base["images"]
    assert base["flops"] >= six_n  # forward (2N) + backward (4N) per token, plus attention
    assert rrepa["flops"] > base["flops"]  # the pseudo-reverse passes and projectors add work


def test_flop_count_includes_backward():
    setup = lambda: bench_train.setup_step("quick", "cpu", "none", None)  # noqa: E731
    cfg = bench_train.FlowConfig(**bench_train.CONFIGS["quick"]["flow"])
    flops = bench_train.count_flops(setup)
    two_n = 2 * bench_train.linear_params(cfg) * cfg.num_tokens * bench_train.CONFIGS["quick"]["batch"]
    assert flops > 2.5 * two_n  # a forward-only count would be about 2N per token (plus attention)
