"""Every stage of the pipeline, run in this process on a tiny profile: outputs, key files, locks, declared reads."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import stage, tiny_params

from flowback.params import load_params
from flowback.pipeline import Pipeline
from flowback.tables import MISSING


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """Every stage of a tiny profile (guidance sweep, FID curve and calibration included); baseline's seed 1 and
    forward_12 deliberately not run."""
    tmp = tmp_path_factory.mktemp("jobs")
    p = tiny_params(tmp, experiments={"baseline": {"strategy": "none", "seeds": [0, 1]},
                                      "reverse_78": {"strategy": "reverse", "position": "7&8"},
                                      "forward_12": {"strategy": "forward", "position": "1&2"},
                                      "af": {"family": "af"},
                                      "reverse_78_at2": {"milestone": {"of": "reverse_78", "step": 2}}},
                    train={"milestones": [2]}, af={"generator": {"width": 16, "depth": 1, "head_dim": 8},
                        "train": {"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 2}})
    pipe = Pipeline(load_params(p), str(p))
    for inst in pipe.instances:  # in pipeline order; baseline's seed 1 and forward_12 deliberately not run
        if inst.run not in ("baseline-s1", "forward_12-s0"):
            stage(inst.stage, p, inst.run)
    return tmp, p


def test_every_stage_writes_its_outputs(pipeline_run):
    tmp, p = pipeline_run
    run = tmp / "results" / "runs" / "reverse_78-s0"
    npz = np.load(run / "samples.npz", allow_pickle=False)
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (30, 16, 16, 1)
    assert np.bincount(npz["arr_1"]).tolist() == [3] * 10
    assert (run / "samples.png").stat().st_size > 0 and not (run / "chunks").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("fid", "sfid", "is", "precision", "recall", "acc", "cond_acc"):
        assert np.isfinite(metrics[key]), key
    assert metrics["reference"] == "digits/train"
    science = set(metrics) | set(json.loads((run / "train.json").read_text()))
    assert not {"seconds", "images_per_second", "steps_per_second"} & science  # timings are not metrics
    assert json.loads((run / "train_timing.json").read_text())["images_per_second"] > 0
    ref_report = json.loads((tmp / "metric" / "reference.json").read_text())
    assert ref_report["count"] == 1438 and ref_report["source"] == "digits/train" and "seconds" not in ref_report
    train_log = pd.read_csv(run / "train_log.csv")
    assert list(train_log["step"]) == [1, 2, 3] and train_log["align"].abs().gt(0).all()


def test_a_milestone_run_scores_the_saved_model_without_training(pipeline_run):
    tmp, p = pipeline_run
    runs = tmp / "results" / "runs"
    assert (runs / "reverse_78-s0" / "milestones" / "step_2.pt").exists()
    assert not (runs / "reverse_78_at2-s0" / "model.pt").exists()
    at2 = json.loads((runs / "reverse_78_at2-s0" / "metrics.json").read_text())
    final = json.loads((runs / "reverse_78-s0" / "metrics.json").read_text())
    assert np.isfinite(at2["fid"]) and at2["fid"] != final["fid"]
    with pytest.raises(SystemExit):
        stage("train", p, "reverse_78_at2-s0")


def test_the_table_marks_what_was_not_run_and_shows_seeds(pipeline_run):
    tmp, _ = pipeline_run
    tables = tmp / "results" / "tables"
    df = pd.read_csv(tables / "ablation.csv")
    assert list(df["Experiment"]) == ["baseline", "reverse_78", "forward_12", "af", "reverse_78_at2"]
    assert list(df["Seeds"]) == ["1/2", "1/1", "0/1", "1/1", "1/1"]
    assert list(df.loc[df.Experiment == "reverse_78_at2", "Strategy"]) == ["Reverse"]
    assert df.loc[df.Experiment == "forward_12", "FID"].isna().all()
    fid = json.loads((tmp / "results" / "runs" / "reverse_78-s0" / "metrics.json").read_text())["fid"]
    assert df.loc[df.Experiment == "reverse_78", "FID"].iloc[0] == pytest.approx(fid)
    md = (tables / "ablation.md").read_text()
    assert "Block 7&8" in md and MISSING in md and "not run" in md and "Cond. acc." in md and "Probe acc." in md
    probe = json.loads((tmp / "results" / "runs" / "reverse_78-s0" / "probe.json").read_text())
    layers = json.loads((tmp / "results" / "runs" / "reverse_78-s0" / "probe_layers.json").read_text())
    assert len(layers["accuracy"]) == 8 and probe["best"] in layers["accuracy"]  # 8 blocks x 1 layer, all probed
    assert probe["best_accuracy"] == pytest.approx(layers["accuracy"][probe["best"]])  # reported on val
    assert probe["best"] == max(layers["selection"], key=layers["selection"].get)  # chosen on held-out train
    row = df[df.Experiment == "reverse_78"].iloc[0]
    assert row["Probe acc. (%)"] == pytest.approx(probe["best_accuracy"]) and 0 <= row["Probe acc. (%)"] <= 100
    assert pd.isna(df.loc[df.Experiment == "af", "Probe acc. (%)"]).all()  # no probe for an adversarial flow
    for figure in ("training_curves.png", "samples.png"):
        assert (tables / figure).stat().st_size > 0


def test_each_finished_stage_writes_its_key_file(pipeline_run):
    tmp, p = pipeline_run
    pipe = Pipeline(load_params(p), str(p))
    done = {"prepare", "encoder", "metricnet", "reference", "table", "train_baseline-s0", "sample_reverse_78-s0"}
    for name in done:
        assert pipe.stamp(pipe.by_name[name]).exists(), name
    assert not pipe.stamp(pipe.by_name["train_baseline-s1"]).exists()
    ran = {i.name for i in pipe.instances if i.run not in ("baseline-s1", "forward_12-s0")}
    stamps = {f.name.rsplit(".", 2)[0] for f in (tmp / "results" / "stamps").glob("*.key")}
    assert stamps == ran and {"sweep_reverse_78-s0", "curve_baseline-s0", "calibrate"} <= stamps
    assert "sweep_af-s0" not in pipe.by_name and "curve_reverse_78_at2-s0" not in pipe.by_name  # no guidance; no training


def test_a_second_runner_of_the_same_instance_stops_naming_the_holder(pipeline_run, capsys):
    """...while another stage of the same run goes ahead (snakemake -j2 runs a run's probe beside its sweep)."""
    from flowback.runner import run_lock

    tmp, p = pipeline_run
    run_dir = tmp / "results" / "runs" / "baseline-s0"
    with run_lock(run_dir / ".evaluate.lock", "evaluate baseline-s0"):
        stage("probe", p, "baseline-s0")
        with pytest.raises(SystemExit) as e:
            stage("evaluate", p, "baseline-s0")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "is being run by pid" in err and "wait for it to finish" in err and len(err.strip().splitlines()) == 1


def test_a_stage_that_reads_an_undeclared_key_fails_at_once(pipeline_run, monkeypatch, capsys):
    import flowback.stages.table as table

    _, p = pipeline_run
    monkeypatch.setattr(table, "NOTE_KEYS", [k for k in table.NOTE_KEYS if k != "train.steps"])
    with pytest.raises(SystemExit):
        stage("table", p)
    assert "stage 'table' read params key 'train.steps'" in capsys.readouterr().err


def test_an_adversarial_flow_runs_in_the_same_pipeline(pipeline_run):
    """family af: its own training and one-step sampler, the same metrics and table, no classifier (no likelihood)."""
    tmp, _ = pipeline_run
    run = tmp / "results" / "runs" / "af-s0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["cond_acc"]) and metrics["acc"] is None
    assert json.loads((run / "sample.json").read_text())["nfe"] == 1
    assert np.load(run / "samples.npz")["arr_0"].shape == (30, 16, 16, 1)
    df = pd.read_csv(tmp / "results" / "tables" / "ablation.csv")
    row = df[df.Experiment == "af"].iloc[0]
    assert row["Strategy"] == "Adversarial flow (1 NFE)" and pd.isna(row["Acc. (%)"])
    assert "without a likelihood" in (tmp / "results" / "tables" / "ablation.md").read_text()
