"""The pipeline end to end on a tiny profile, sampling resume, the classifier, the tables, and the DAG views."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from flowback.metrics.classifier import classify
from flowback.models import FlowConfig, TARFlow
from flowback.sampler import balanced_labels, generate
from flowback.tables import MISSING, ablation_frame, position_label, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(tmp: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["results"] = str(tmp / "results")
    raw["data"]["root"] = str(tmp / "data")
    raw["encoder"]["dir"] = str(tmp / "enc")
    raw["encoder"]["kwargs"].update(embed_dim=16, depth=1, num_heads=2)
    raw["encoder"]["train"]["steps"] = 5
    raw["metrics"]["dir"] = str(tmp / "metric")
    raw["metrics"]["train"]["steps"] = 5
    raw["model"].update(width=16, layers=1, head_dim=8, mlp_ratio=1)
    raw["train"].update(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=1, threads=1)
    raw["sample"].update(per_class=3, batch_size=16)
    raw["experiments"] = {"baseline": {"strategy": "none"}, "reverse_78": {"strategy": "reverse", "position": "7&8"},
                          "forward_12": {"strategy": "forward", "position": "1&2"}}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_every_stage_runs_and_the_table_marks_what_was_not_run(tmp_path):
    from stages import encoder, evaluate, metricnet, prepare, reference, sample, table, train

    p = str(tiny_params(tmp_path))
    common = ["--params", p, "--quiet"]
    prepare.main(common)
    encoder.main(common)
    metricnet.main(common)
    reference.main(common)  # once, for every experiment's evaluate
    for exp in ("baseline", "reverse_78"):  # forward_12 deliberately not run
        train.main(common + ["--experiment", exp])
        sample.main(common + ["--experiment", exp])
        evaluate.main(common + ["--experiment", exp])
    table.main(common)

    run = tmp_path / "results" / "runs" / "reverse_78"
    npz = np.load(run / "samples.npz", allow_pickle=False)
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (30, 16, 16, 1)
    assert np.bincount(npz["arr_1"]).tolist() == [3] * 10
    assert (run / "samples.png").stat().st_size > 0 and not (run / "chunks").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("fid", "sfid", "is", "precision", "recall", "acc"):
        assert np.isfinite(metrics[key]), key
    assert metrics["reference"] == "digits/train"
    ref_report = json.loads((tmp_path / "metric" / "reference.json").read_text())
    assert ref_report["count"] == 1438 and ref_report["source"] == "digits/train"
    assert (tmp_path / "metric" / "reference" / "digits-train.npz").exists()
    train_log = pd.read_csv(run / "train_log.csv")
    assert list(train_log["step"]) == [1, 2, 3] and train_log["align"].abs().gt(0).all()

    df = pd.read_csv(tmp_path / "results" / "tables" / "ablation.csv")
    assert list(df["Experiment"]) == ["baseline", "reverse_78", "forward_12"]
    assert df.loc[df.Experiment == "forward_12", "FID"].isna().all()
    assert df.loc[df.Experiment == "reverse_78", "FID"].iloc[0] == pytest.approx(metrics["fid"])
    md = (tmp_path / "results" / "tables" / "ablation.md").read_text()
    assert "Block 7&8" in md and MISSING in md and "not run" in md
    assert (tmp_path / "results" / "tables" / "training_curves.png").stat().st_size > 0


def small_flow():
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(channels=1, image_size=4, patch_size=2, width=16, layers=(1, 1), head_dim=8,
                               mlp_ratio=1, num_classes=3)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.proj_out.weight.normal_(0, 0.1)
    return model


def test_sampling_resumes_without_duplicates_or_gaps(tmp_path, monkeypatch):
    model = small_flow()
    labels = balanced_labels(3, 5)
    full, _ = generate(model, labels, tmp_path / "a", 4, seed=1, show_progress=False, key="k")

    import flowback.sampler as sampler

    calls = {"n": 0}
    real = sampler.save_npz

    def dying_save(path, **arrays):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while writing the third chunk
        real(path, **arrays)

    monkeypatch.setattr(sampler, "save_npz", dying_save)
    with pytest.raises(KeyboardInterrupt):
        generate(model, labels, tmp_path / "b", 4, seed=1, show_progress=False, key="k")
    monkeypatch.setattr(sampler, "save_npz", real)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.npz")) == ["000000.npz", "000001.npz"]
    resumed, _ = generate(model, labels, tmp_path / "b", 4, seed=1, show_progress=False, key="k")
    assert resumed.shape == full.shape == (15, 4, 4, 1)
    assert np.array_equal(resumed, full)
    # another key (other checkpoint or settings) never reuses old chunks
    other, _ = generate(model, labels, tmp_path / "b", 4, seed=2, show_progress=False, key="k2")
    assert not np.array_equal(other, full)


def test_balanced_labels_are_balanced_in_every_prefix():
    labels = balanced_labels(4, 3)
    assert labels.tolist() == [0, 1, 2, 3] * 3


def test_classifier_picks_the_class_whose_embedding_raises_the_likelihood():
    model = small_flow()
    x = torch.randn(6, 1, 4, 4).clamp(-1, 1)
    pred = classify(model, x)
    # brute force: the class with the largest d log p / d lambda_k, by finite differences on lambda at 0
    eps = 1e-3
    K = model.cfg.num_classes
    base = model.log_prob(x, class_weights=torch.full((6, K), 1 / K))
    fd = []
    for k in range(K):
        lam = torch.zeros(6, K)
        lam[:, k] = eps
        fd.append((model.log_prob(x, class_weights=lam.softmax(-1)) - base) / eps)
    assert torch.equal(pred, torch.stack(fd, 1).argmax(1))


def test_position_labels_follow_the_paper():
    assert position_label(None) == "-"
    assert position_label("all") == "All blocks"
    assert position_label("7&8") == "Block 7&8"
    assert position_label("7&8 layer 6") == "Block 7&8, L6"


def test_table_marks_missing_cells_and_never_fills_them():
    df = ablation_frame([
        {"experiment": "baseline", "strategy": "none", "position": None, "metrics": {"fid": 1.0, "sfid": 2.0,
                                                                                      "is": 3.0, "acc": 40.0}},
        {"experiment": "reverse_78", "strategy": "reverse", "position": "7&8", "metrics": None},
    ])
    md = to_markdown(df, "t")
    assert "| TARFlow baseline | -" in md and "1.00" in md
    assert md.count(MISSING) >= 4 and "4 cells" in md


def test_snakemake_dry_run_lists_the_grid():
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    r = subprocess.run([exe, "-n", "--forceall", "ablation_table"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["experiments"]
    for name in experiments:
        assert f"results/runs/{name}/metrics.json" in out
    n = len(experiments)
    for rule, count in (("train", n), ("sample", n), ("evaluate", n), ("ablation_table", 1), ("prepare", 1),
                        ("reference", 1)):
        assert re.search(rf"^{rule}\s+{count}$", out, re.MULTILINE), rule


def test_dvc_expands_the_same_registry():
    exe = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    r = subprocess.run([exe, "stage", "list"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["experiments"]
    for name in experiments:
        for stage in ("train", "sample", "evaluate"):
            assert f"{stage}@{name}" in r.stdout
    assert re.search(r"^reference\s", r.stdout, re.MULTILINE)  # one stage, not one per experiment
    assert "reference@" not in r.stdout
