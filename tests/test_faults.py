"""Faults: a write error keeps the previous good file; a train stage killed with SIGKILL resumes to the same model."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import flowback.io as fio
from flowback.io import load_torch, save_torch

ROOT = Path(__file__).resolve().parents[1]


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_torch(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_torch(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    state = load_torch(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_write_error_in_json_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    fio.save_json(path, {"fid": 1.0})
    monkeypatch.setattr(fio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        fio.save_json(path, {"fid": 2.0})
    assert fio.load_json(path) == {"fid": 1.0}


def tiny_params(tmp: Path, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["results"] = str(tmp / "results")
    raw["data"]["root"] = str(tmp / "data")
    raw["model"].update(width=16, layers=1, head_dim=8, mlp_ratio=1)
    raw["train"].update(steps=steps, batch_size=8, warmup_steps=1, checkpoint_every=5, log_every=1, threads=1)
    raw["experiments"] = {"baseline": {"strategy": "none"}}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stage(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
def test_train_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 400
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        params = tiny_params(d, steps)
        assert run_stage("stages.prepare", "--params", str(params), "--quiet").wait() == 0
    full = run_stage("stages.train", "--params", str(tiny_params(a, steps)), "--experiment", "baseline", "--quiet")

    state = b / "results" / "runs" / "baseline" / ".resume" / "state.pt"
    victim = run_stage("stages.train", "--params", str(tiny_params(b, steps)), "--experiment", "baseline", "--quiet")
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run past the checkpoint, into steps that will be lost
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    model_b = b / "results" / "runs" / "baseline" / "model.pt"
    assert not model_b.exists(), "the run finished before it was killed: raise `steps`"
    killed_at = load_torch(state)["step"]
    assert 0 < killed_at < steps

    resumed = run_stage("stages.train", "--params", str(tiny_params(b, steps)), "--experiment", "baseline", "--quiet")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert full.wait() == 0, full.stderr.read().decode()[-2000:]
    wa = load_torch(a / "results" / "runs" / "baseline" / "model.pt")["weights"]
    wb = load_torch(model_b)["weights"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    log_a = (a / "results" / "runs" / "baseline" / "train_log.csv").read_text()
    log_b = (b / "results" / "runs" / "baseline" / "train_log.csv").read_text()
    assert log_a == log_b
    assert not state.exists()  # the finished stage removes its resume state
    summary = fio.load_json(b / "results" / "runs" / "baseline" / "train.json")
    assert summary["resumed_from"] == killed_at  # it really continued, rather than starting over identically


@pytest.mark.slow
def test_sample_killed_with_sigkill_resumes_without_duplicates_or_gaps(tmp_path):
    import shutil

    a = tmp_path / "a"
    a.mkdir()
    params_a = tiny_params(a, 20)
    raw = yaml.safe_load(params_a.read_text())
    raw["sample"].update(per_class=60, batch_size=10, device="cpu")  # 600 images in 60 chunks
    params_a.write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in (("stages.prepare",), ("stages.train", "--experiment", "baseline")):
        p = run_stage(*stage, "--params", str(params_a), "--quiet")
        assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    params_b = b / "params.yaml"
    params_b.write_text(params_a.read_text().replace(str(a), str(b)))

    full = run_stage("stages.sample", "--params", str(params_a), "--experiment", "baseline", "--quiet")
    run_b = b / "results" / "runs" / "baseline"
    victim = run_stage("stages.sample", "--params", str(params_b), "--experiment", "baseline", "--quiet")
    deadline = time.time() + 120
    while not (run_b / "chunks" / "000003.npz").exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = len(list((run_b / "chunks").glob("*.npz")))
    assert not (run_b / "samples.npz").exists() and 3 <= done < 60, "the kill should land mid-way"

    resumed = run_stage("stages.sample", "--params", str(params_b), "--experiment", "baseline", "--quiet")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert full.wait() == 0, full.stderr.read().decode()[-2000:]
    sa = fio.load_npz(a / "results" / "runs" / "baseline" / "samples.npz")
    sb = fio.load_npz(run_b / "samples.npz")
    assert sb["arr_0"].shape == (600, 16, 16, 1)
    assert (sb["arr_1"] == sa["arr_1"]).all() and (sb["arr_1"].reshape(60, 10) == range(10)).all()  # balanced
    assert (sa["arr_0"] == sb["arr_0"]).all()  # the same images: none duplicated, none missing, none redrawn
    assert not (run_b / "chunks").exists()
