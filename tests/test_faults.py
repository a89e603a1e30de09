"""Faults: a write error keeps the previous good file; a train stage killed with SIGKILL resumes to the same model."""

import errno
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, command, tiny_params

import flowback.io as fio
from flowback.io import DiskFullError, load_torch, save_torch


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_torch(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError, match=r"state.pt: no space left on the device .* needed, .* free\); the "
                                            r"previous file is intact"):
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


@pytest.mark.slow
def test_dead_writers_temporary_files_are_removed_by_the_next_writer(tmp_path):
    path = tmp_path / "state.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    host = fio._HOST
    left = tmp_path / f".state.pt.{host}.{dead.pid}.abc123.tmp"
    mine = tmp_path / f".state.pt.{host}.{os.getpid()}.def456.tmp"
    other_host = tmp_path / f".state.pt.elsewhere.{dead.pid}.ghi789.tmp"
    for f in (left, mine, other_host):
        f.write_bytes(b"half a checkpoint")
    save_torch(path, {"step": 1})
    assert not left.exists() and mine.exists() and other_host.exists()
    assert ".state.pt.*.tmp" in (ROOT / ".gitignore").read_text() or "*.tmp" in (ROOT / ".gitignore").read_text()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        fio.save_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == mode


def tiny(tmp: Path, steps: int, **sample) -> Path:
    return tiny_params(tmp, train={"steps": steps, "checkpoint_every": 5}, sample=sample or {},
                       sweep={"scales": []}, experiments={"baseline": {"strategy": "none"}})


def run_stage(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C as from a terminal: a pytest started in the background (`cmd &`) ignores SIGINT, and a child that starts
    # with SIGINT ignored never raises KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_train_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 400
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        params = tiny(d, steps)
        assert run_stage("flowback", "stage", "prepare", "--params", str(params), "--quiet").wait() == 0
    full = run_stage("flowback", "stage", "train", "baseline-s0", "--params", str(tiny(a, steps)), "--quiet")

    state = b / "results" / "runs" / "baseline-s0" / ".resume" / "state.pt"
    victim = run_stage("flowback", "stage", "train", "baseline-s0", "--params", str(tiny(b, steps)), "--quiet")
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run past the checkpoint, into steps that will be lost
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    model_b = b / "results" / "runs" / "baseline-s0" / "model.pt"
    assert not model_b.exists(), "the run finished before it was killed: raise `steps`"
    killed_at = load_torch(state)["step"]
    assert 0 < killed_at < steps

    resumed = run_stage("flowback", "stage", "train", "baseline-s0", "--params", str(tiny(b, steps)), "--quiet")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert full.wait() == 0, full.stderr.read().decode()[-2000:]
    wa = load_torch(a / "results" / "runs" / "baseline-s0" / "model.pt")["weights"]
    wb = load_torch(model_b)["weights"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    log_a = (a / "results" / "runs" / "baseline-s0" / "train_log.csv").read_text()
    log_b = (b / "results" / "runs" / "baseline-s0" / "train_log.csv").read_text()
    assert log_a == log_b
    assert not state.exists()  # the finished stage removes its resume state
    summary = fio.load_json(b / "results" / "runs" / "baseline-s0" / "train_timing.json")
    assert summary["resumed_from"] == killed_at  # it really continued, rather than starting over identically


@pytest.mark.slow
def test_sample_killed_with_sigkill_resumes_without_duplicates_or_gaps(tmp_path):
    import shutil

    a = tmp_path / "a"
    a.mkdir()
    params_a = tiny(a, 20, per_class=60, batch_size=10)  # 600 images in 60 chunks
    for stage in (("flowback", "stage", "prepare",), ("flowback", "stage", "train", "baseline-s0")):
        p = run_stage(*stage, "--params", str(params_a), "--quiet")
        assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    params_b = b / "params.yaml"
    params_b.write_text(params_a.read_text().replace(str(a), str(b)))

    full = run_stage("flowback", "stage", "sample", "baseline-s0", "--params", str(params_a), "--quiet")
    run_b = b / "results" / "runs" / "baseline-s0"
    victim = run_stage("flowback", "stage", "sample", "baseline-s0", "--params", str(params_b), "--quiet")
    deadline = time.time() + 120
    while not (run_b / "chunks" / "000003.npz").exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = len(list((run_b / "chunks").glob("*.npz")))
    assert not (run_b / "samples.npz").exists() and 3 <= done < 60, "the kill should land mid-way"

    resumed = run_stage("flowback", "stage", "sample", "baseline-s0", "--params", str(params_b), "--quiet")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert full.wait() == 0, full.stderr.read().decode()[-2000:]
    sa = fio.load_npz(a / "results" / "runs" / "baseline-s0" / "samples.npz")
    sb = fio.load_npz(run_b / "samples.npz")
    assert sb["arr_0"].shape == (600, 16, 16, 1)
    assert (sb["arr_1"] == sa["arr_1"]).all() and (sb["arr_1"].reshape(60, 10) == range(10)).all()  # balanced
    assert (sa["arr_0"] == sb["arr_0"]).all()  # the same images: none duplicated, none missing, none redrawn
    assert not (run_b / "chunks").exists()


class _Planted:  # an object a malicious or careless checkpoint might carry
    pass


@pytest.mark.parametrize("damage, words", [
    ("empty", "empty file"),
    ("bytes", "not a checkpoint"),
    ("truncated", "truncated"),
    ("pickle", "refused: it contains pickled code"),
])
def test_a_damaged_checkpoint_is_named_in_plain_words(tmp_path, damage, words):
    from flowback.io import FlowBackFileError

    path = tmp_path / "model.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "bytes":
        path.write_bytes(b"\x00\x01 random bytes, not torch's format" * 10)
    elif damage == "truncated":
        save_torch(path, {"w": torch.randn(256, 256)})
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"w": torch.zeros(2), "x": _Planted()}, path)
    with pytest.raises(FlowBackFileError) as err:
        load_torch(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and words in msg and "weights_only=False" not in msg, msg



# ------------------------------------------------------------------------------------------- one line, never a stack
def one_line(err: str) -> str:
    """The single line a refused command printed on stderr (no traceback, nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("bad", ["bytes", "directory"])
@pytest.mark.parametrize("args", [["check"], ["stage", "prepare"]])
def test_a_params_file_of_bytes_or_a_directory_is_one_line(tmp_path, capsys, bad, args):
    from flowback.cli import main

    path = tmp_path / "params.yaml"
    if bad == "bytes":
        path.write_bytes(b"seed: 0\nresults: \xff\xfe\n")
    else:
        path.mkdir()
    code = main([*args, "--params", str(path)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and f"error: {path}: " in line
    assert ("not a UTF-8 text file (byte 17 is b'\\xff')" if bad == "bytes" else "is a directory") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.slow
def test_a_params_directory_is_one_line_from_the_command_line(tmp_path):
    r = command("-m", "flowback", "check", "--params", str(tmp_path))
    assert r.returncode == 2 and one_line(r.stderr) == (f"flowback: error: {tmp_path}: is a directory, not a params "
                                                        f"file (e.g. params.yaml or profiles/imagenet64.yaml)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Prepared digits and baseline-s0 trained for 3 steps, shared read-only; `variant` writes params that read this
    data and model but write under their own directory."""
    from conftest import stage, tiny_raw, write_params

    tmp = tmp_path_factory.mktemp("trained")
    raw = tiny_raw(tmp, experiments={"baseline": {"strategy": "none", "seeds": [0, 1]},
                                     "reverse_78": {"strategy": "reverse", "position": "7&8"}},
                   sweep={"scales": []})  # sample straight from the model: no sweep.json to read first
    params = write_params(tmp, raw)
    stage("prepare", params)
    stage("train", params, "baseline-s0")
    return tmp, raw


def variant(trained, tmp: Path, copy_model: str | None = None, **sections) -> Path:
    """Params reading `trained`'s data, writing results under `tmp` (with baseline-s0's model.pt copied in as
    run `copy_model`'s, if given)."""
    import copy
    import shutil

    from conftest import write_params

    base, raw = trained
    raw = copy.deepcopy(raw)
    raw["results"] = str(tmp / "results")
    for section, value in sections.items():
        raw[section].update(value)
    if copy_model:
        dest = tmp / "results" / "runs" / copy_model / "model.pt"
        dest.parent.mkdir(parents=True)
        shutil.copy(base / "results" / "runs" / "baseline-s0" / "model.pt", dest)
    return write_params(tmp, raw)


def run_in_process(capsys, name: str, params: Path, run: str | None = None) -> tuple[int, str]:
    """`python -m flowback stage NAME [RUN]` in this process: (exit status, stderr)."""
    from flowback.cli import main

    args = ["stage", name, *([run] if run else []), "--params", str(params), "--quiet"]
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def test_ctrl_c_in_training_is_one_line_with_the_step_and_where_a_rerun_resumes(trained, tmp_path, capsys,
                                                                                 monkeypatch):
    import flowback.training as tr

    params = variant(trained, tmp_path, train={"steps": 10, "checkpoint_every": 5})
    real = tr.learning_rate

    def ctrl_c_at_step_7(step, *args):
        if step == 7:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(tr, "learning_rate", ctrl_c_at_step_7)
    code, err = run_in_process(capsys, "train", params, "baseline-s0")
    state = tmp_path / "results" / "runs" / "baseline-s0" / ".resume" / "state.pt"
    assert code == 130 and one_line(err) == (f"flowback stage train: interrupted at step 7; rerun resumes from step 5 "
                                             f"(the last saved state, {state})")
    assert load_torch(state)["step"] == 5
    monkeypatch.setattr(tr, "learning_rate", real)
    code, err = run_in_process(capsys, "train", params, "baseline-s0")
    assert code == 0, err
    assert fio.load_json(state.parent.parent / "train_timing.json")["resumed_from"] == 5  # as the line said


def test_ctrl_c_before_the_first_saved_state_says_training_starts_over(trained, tmp_path, capsys, monkeypatch):
    import flowback.training as tr

    params = variant(trained, tmp_path, train={"steps": 10, "checkpoint_every": 5})
    monkeypatch.setattr(tr, "learning_rate", lambda step, *a: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3
                        else 1e-3)
    code, err = run_in_process(capsys, "train", params, "baseline-s0")
    assert code == 130 and one_line(err) == ("flowback stage train: interrupted at step 3; no state was saved yet "
                                             "(train.checkpoint_every): rerun starts from step 0")


@pytest.mark.parametrize("name, run, target, then", [
    ("sample", "baseline-s0", "flowback.sampler.generate",
     "rerun resumes from the finished chunks (chunks/ in the run directory)"),
    ("prepare", None, "flowback.data.writer.write_split", "rerun resumes from the finished shards"),
    ("probe", "baseline-s0", "flowback.metrics.probe.linear_probe", "rerun starts it over"),
])
def test_ctrl_c_in_another_stage_is_one_line_saying_what_a_rerun_reuses(trained, tmp_path, capsys, monkeypatch,
                                                                          name, run, target, then):
    import importlib
    import shutil

    params = variant(trained, tmp_path)
    if name == "prepare":  # its own data directory: prepare rewrites it
        params = variant(trained, tmp_path, data={"root": str(tmp_path / "data")})
    else:
        (tmp_path / "results" / "runs" / "baseline-s0").mkdir(parents=True)
        shutil.copy(trained[0] / "results" / "runs" / "baseline-s0" / "model.pt",
                    tmp_path / "results" / "runs" / "baseline-s0" / "model.pt")
    module, _, attr = target.rpartition(".")
    monkeypatch.setattr(importlib.import_module(module), attr,
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run_in_process(capsys, name, params, run)
    assert code == 130 and one_line(err) == f"flowback stage {name}: interrupted; {then}"


@pytest.mark.slow
def test_sigint_of_a_training_process_prints_one_line_and_the_rerun_resumes_there(tmp_path):
    import re

    params = tiny(tmp_path, 400)
    assert run_stage("flowback", "stage", "prepare", "--params", str(params), "--quiet").wait() == 0
    state = tmp_path / "results" / "runs" / "baseline-s0" / ".resume" / "state.pt"
    victim = run_stage("flowback", "stage", "train", "baseline-s0", "--params", str(params), "--quiet")
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGINT)
    err = victim.stderr.read().decode()
    assert victim.wait() == 130, err
    m = re.fullmatch(rf"flowback stage train: interrupted at step (\d+); rerun resumes from step (\d+) \(the last "
                     rf"saved state, {re.escape(str(state))}\)", one_line(err))
    assert m, err
    at, saved = int(m[1]), int(m[2])
    assert 0 < saved <= at < 400 and saved % 5 == 0 and load_torch(state)["step"] == saved
    rerun = run_stage("flowback", "stage", "train", "baseline-s0", "--params", str(params), "--quiet")
    assert rerun.wait() == 0, rerun.stderr.read().decode()[-2000:]
    assert fio.load_json(state.parent.parent / "train_timing.json")["resumed_from"] == saved


def test_ctrl_c_inside_a_state_write_is_delivered_after_it(tmp_path, monkeypatch):
    """A Ctrl-C that lands inside torch.save would leave torch's zip writer raising a RuntimeError (a traceback, not
    the resume line): the runner delivers it once the write is done, and the file is whole."""
    from flowback.runner import ctrl_c_between_writes

    real, seen = torch.save, []

    def save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while torch writes
        seen.append("signalled")
        real(obj, f)
        seen.append("written")

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "state.pt"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_between_writes():
                fio.save_torch(path, {"w": torch.ones(1000)})
                seen.append("returned")
                time.sleep(2)  # the re-delivered Ctrl-C lands here
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen == ["signalled", "written", "returned"]
    assert torch.load(path, weights_only=True)["w"].sum() == 1000


class _FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: the write that does not fit writes what fits, the next one fails with
    ENOSPC, as a real full disk does (torch's zip writer then raises a RuntimeError of inline_container.cc)."""

    room = 4096

    def write(self, b):
        if len(b) <= self.room:
            self.room -= len(b)
            return super().write(b)
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        n, self.room = super().write(bytes(b)[: self.room]), 0
        return n


def full_disk_open(monkeypatch, name: str):
    """Make save_torch's writes of files named `name` (their temporaries) meet a full disk."""
    real = open

    def fake(path, mode="r", *args, **kwargs):
        if mode == "wb" and Path(path).name.startswith(f".{name}."):
            return io.BufferedWriter(_FullDisk(path, "wb"))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(fio, "open", fake, raising=False)


def test_a_full_disk_under_torch_save_is_one_error_naming_the_file_and_the_bytes(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_torch(path, {"step": 1, "w": torch.ones(3)})
    full_disk_open(monkeypatch, "state.pt")
    with pytest.raises(DiskFullError) as err:
        save_torch(path, {"step": 2, "w": torch.zeros(2**18)})  # 1 MiB of tensors
    assert str(err.value).startswith(f"{path}: no space left on the device while writing it (about 1.0 MiB "
                                     f"needed, ") and "the previous file is intact" in str(err.value)
    monkeypatch.undo()
    assert load_torch(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_full_disk_during_training_is_one_line_naming_the_state_file(trained, tmp_path, capsys, monkeypatch):
    params = variant(trained, tmp_path)
    full_disk_open(monkeypatch, "state.pt")
    code, err = run_in_process(capsys, "train", params, "baseline-s0")
    state = tmp_path / "results" / "runs" / "baseline-s0" / ".resume" / "state.pt"
    line = one_line(err)
    assert code == 2 and line.startswith(f"flowback stage train: error: {state}: no space left on the device while "
                                         f"writing it (about "), line
    assert "MiB needed" in line and "nothing was written - free space and run again" in line
    assert not list(state.parent.iterdir())  # no temporary left


@pytest.mark.parametrize("name, run, switch", [("decoder", None, "decoder.enabled"),
                                               ("probe", "baseline-s0", "metrics.probe.enabled")])
def test_a_disabled_stage_is_refused_in_one_line_and_writes_nothing(tmp_path, capsys, name, run, switch):
    params = tiny_params(tmp_path, metrics={"probe": {"enabled": False}})
    code, err = run_in_process(capsys, name, params, run)
    assert code == 2 and one_line(err) == (f"flowback stage {name}: error: {params}: {switch} is off (false or "
                                           f"empty), so stage "
                                           f"{name} is not part of this pipeline; nothing was run")
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def _relabel(data: Path, split: str = "train") -> None:
    """Give one sample of the split's first shard another valid class, and re-point the manifest's sha256 at the new
    shard: every per-shard check passes."""
    from flowback.data.format import encode_png, read_shard, write_samples
    from flowback.io import load_json, save_json, sha256_file

    manifest = load_json(data / "manifest.json")
    entry = manifest["splits"][split]["shards"][0]
    path = data / entry["name"]
    samples = sorted(read_shard(path, num_classes=10), key=lambda s: s["key"])
    samples[0]["label"] = (samples[0]["label"] + 1) % 10
    write_samples(path, [{"__key__": s["key"], "png": encode_png(s["image"]), "cls": str(s["label"]).encode()}
                         for s in samples])
    entry["sha256"] = sha256_file(path)
    save_json(data / "manifest.json", manifest)


def test_a_relabelled_shard_with_its_sha_repointed_stops_training(trained, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained[0] / "data", data)
    _relabel(data / "digits")
    params = variant(trained, tmp_path, data={"root": str(data)})
    code, err = run_in_process(capsys, "train", params, "baseline-s0")
    line = one_line(err)
    assert code == 2 and line.startswith(f"flowback stage train: error: {data / 'digits' / 'manifest.json'}: split "
                                         f"'train' per-class counts ["), line
    assert "do not match the manifest's [" in line and "re-run `python -m flowback stage prepare`" in line
    assert not (tmp_path / "results" / "runs" / "baseline-s0" / "model.pt").exists()


@pytest.mark.parametrize("name", ["sample", "probe"])
@pytest.mark.parametrize("run, differs", [
    ("reverse_78-s0", "experiment: checkpoint 'baseline' vs run 'reverse_78', strategy: checkpoint 'none' vs run "
                      "'reverse', position: checkpoint None vs run '7&8'"),
    ("baseline-s1", "seed: checkpoint 0 vs run 1"),
])
def test_a_model_copied_from_another_run_is_refused_naming_both(trained, tmp_path, capsys, name, run, differs):
    params = variant(trained, tmp_path, copy_model=run)
    code, err = run_in_process(capsys, name, params, run)
    model = tmp_path / "results" / "runs" / run / "model.pt"
    assert code == 2 and one_line(err) == (f"flowback stage {name}: error: {model}: holds the model of another run "
                                           f"({differs}); re-train this run or restore its own model file")
    assert sorted(p.name for p in model.parent.iterdir()) == [f".{name}.lock", "model.pt"]  # nothing drawn or scored


def test_the_model_of_its_own_run_or_milestone_source_passes_the_check(trained):
    from flowback.checkpoints import load_flow
    from flowback.params import load_params

    base, raw = trained
    params = load_params(base / "params.yaml")
    e = params.run("baseline-s0")
    _, meta = load_flow(e.checkpoint, expected_meta=e.model_meta)
    assert meta["experiment"] == "baseline" and meta["seed"] == 0
    raw = {**raw, "experiments": {**raw["experiments"], "late": {"milestone": {"of": "baseline", "step": 3}}}}
    from flowback.params import validate_all, validate

    late = validate_all(validate(raw)).run("late-s0")
    assert late.checkpoint == e.checkpoint and late.model_meta == e.model_meta  # reads baseline's model: accepted


def _checkout(tmp: Path) -> Path:
    """A checkout (its dvc.yaml) with a params file at its root and one in profiles/, paths relative."""
    from conftest import tiny_raw, write_params

    home = tmp / "clone"
    (home / "profiles").mkdir(parents=True)
    (home / "dvc.yaml").write_text("stages: {}\n")
    raw = tiny_raw(home)
    raw["results"], raw["data"]["root"] = "results", "results/data"
    write_params(home, raw)
    write_params(home / "profiles", raw, "tiny.yaml")
    return home


@pytest.mark.parametrize("cwd, params, ok", [
    ("clone", "clone/params.yaml", True),
    ("clone", "clone/profiles/tiny.yaml", True),  # a profile: its paths are relative to the checkout
    ("elsewhere", "clone/params.yaml", False),
    ("clone/profiles", "clone/profiles/tiny.yaml", False),
    ("clone/profiles", "clone/params.yaml", False),
])
def test_relative_paths_need_the_checkout_as_working_directory(tmp_path, monkeypatch, cwd, params, ok):
    from flowback.params import ParamsError, check_working_directory, load_params

    home = _checkout(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    path = tmp_path / params
    p = load_params(path)
    if ok:
        check_working_directory(p, path)
        return
    with pytest.raises(ParamsError) as err:
        check_working_directory(p, path)
    assert str(err.value) == (f"{path}: its relative paths (results: results, data.root: results/data) would "
                              f"resolve against the working directory {tmp_path / cwd}, not {home}: run from {home}, "
                              f"or make the paths absolute")


def test_outside_a_checkout_relative_paths_need_the_params_directory_or_one_above(tmp_path, monkeypatch):
    from conftest import tiny_raw, write_params
    from flowback.params import ParamsError, check_working_directory, load_params

    (tmp_path / "a" / "b").mkdir(parents=True)
    raw = tiny_raw(tmp_path)
    raw["results"] = "results"
    path = write_params(tmp_path / "a", raw)
    p = load_params(path)
    for ok in (tmp_path, tmp_path / "a"):
        monkeypatch.chdir(ok)
        check_working_directory(p, path)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(ParamsError, match=rf"run from {tmp_path / 'a'}, or make the paths absolute"):
        check_working_directory(p, path)
    raw["results"] = str(tmp_path / "results")
    check_working_directory(load_params(write_params(tmp_path / "a", raw)), path)  # absolute: any directory


def test_a_stage_run_from_another_directory_than_the_checkout_is_one_line(tmp_path, capsys, monkeypatch):
    home = _checkout(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, err = run_in_process(capsys, "prepare", home / "params.yaml")
    assert code == 2 and one_line(err).endswith(f"run from {home}, or make the paths absolute")
    assert not list((tmp_path / "elsewhere").iterdir()) and not (home / "results").exists()


@pytest.mark.slow
def test_the_snakefile_run_from_another_directory_is_one_line(tmp_path):
    import shutil

    exe = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    r = subprocess.run([exe, "-s", str(ROOT / "Snakefile"), "-n", "ablation_table"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out and 'File "' not in out, out
    assert (f"snakemake: error: {ROOT / 'Snakefile'}: run snakemake from {ROOT} (cd there, or pass --directory "
            f"{ROOT})") in out
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == [".snakemake"]
    r = subprocess.run([exe, "-s", str(ROOT / "Snakefile"), "--directory", str(ROOT), "-n", "--forceall",
                        "prepare"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_a_text_file_as_reference_batch_is_one_plain_line(tmp_path):
    from flowback.io import FlowBackFileError, load_npz
    from flowback.metrics.reference import read_adm_batch

    path = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    path.write_text("not a npz")  # 9 bytes
    with pytest.raises(FlowBackFileError) as err:
        read_adm_batch(path)
    assert str(err.value) == (f"{path}: not an ADM reference batch (9 bytes that are not an .npz; expected arr_0: "
                              f"uint8 NHWC images, and mu, sigma, mu_s, sigma_s: their pool and spatial statistics, as "
                              f"in guided-diffusion's VIRTUAL_*.npz)")
    with pytest.raises(FlowBackFileError, match=r"not an \.npz file \(9 bytes that are not a zip archive\)$"):
        load_npz(path)
    import numpy as np

    np.savez(path, arr_0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(FlowBackFileError) as err:
        load_npz(path)
    assert "pickle=" not in str(err.value) and str(err.value).endswith("refused: it holds pickled (object) arrays, "
                                                                      "which FlowBack never unpickles")
