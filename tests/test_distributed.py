"""Paper-scale training paths on CPU: DDP (2 gloo ranks, on one node or as two nodes) == 1 process, streamed shards
resume exactly, latent batches with flips, bf16 autocast, the training log rebuilt without duplicates on resume."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import command, tiny_params

from flowback.data.batches import MemoryBatches, ShardBatches
from flowback.data.manifest import write_manifest
from flowback.data.writer import write_split
from flowback.io import load_json, load_torch
from flowback.params import validate
from flowback.stages.train import fingerprint
from flowback.training import train

CPU = torch.device("cpu")


class Crash(Exception):
    pass


def experiment(steps=6, strategy="none", position=None, **train_kw):
    raw = {
        "data": {"image_size": 16},
        "model": {"patch_size": 4, "width": 16, "blocks": 2, "layers": 1, "head_dim": 8, "mlp_ratio": 1},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 3,
                  "log_every": 1, **train_kw},
        "align": {"projector_dim": 16},
        "experiments": {"e": {"strategy": strategy, **({"position": position} if position else {})}},
    }
    return validate(raw).run("e-s0")


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> Path:
    """A tiny 3-channel data set as pixel shards, as `prepare` writes for ImageNet (several shards per split)."""
    d = tmp_path_factory.mktemp("shards")
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (60, 3, 16, 16), dtype=np.uint8)
    labels = np.arange(60) % 10
    splits = {s: write_split(d, s, images, labels, 12, show_progress=False, num_classes=10) for s in ("train", "val")}
    write_manifest(d, {"dataset": "imagenet", "image_size": 16, "channels": 3, "num_classes": 10, "splits": splits})
    return d


def _rgb_experiment(steps=6, **kw):
    exp = experiment(steps, **kw)
    raw = exp.params.model_dump(mode="python")
    raw["data"] = {"dataset": "imagenet", "source": "/unused", "image_size": 16}
    return validate(raw).run("e-s0")


def test_streamed_training_resumes_exactly_at_a_checkpoint(rgb_shards, tmp_path):
    exp = _rgb_experiment(steps=7)

    def source():
        return ShardBatches(rgb_shards, "train", 8, seed=0, segment=3, workers=0, shuffle_buffer=16)

    full = train(exp, source(), tmp_path / "a" / "state.pt", fingerprint(exp), CPU, show_progress=False)

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(exp, source(), tmp_path / "b" / "state.pt", fingerprint(exp), CPU, show_progress=False, on_step=crash_at_5)
    resumed = train(exp, source(), tmp_path / "b" / "state.pt", fingerprint(exp), CPU, show_progress=False)
    assert resumed.resumed_from == 3
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]


def test_shard_batches_are_deterministic_per_segment_and_flip_pixels(rgb_shards):
    a = ShardBatches(rgb_shards, "train", 8, seed=1, segment=4, workers=2, shuffle_buffer=8)
    b = ShardBatches(rgb_shards, "train", 8, seed=1, segment=4, workers=2, shuffle_buffer=8)
    first = [a.get(s) for s in range(6)]
    late = b.get(4)  # a fresh reader asked for step 4 (a resume point) gets what the long run got there
    assert torch.equal(first[4].x, late.x) and torch.equal(first[4].y, late.y)
    assert not torch.equal(first[0].x, first[1].x)
    # flips: every model input is its uint8 pixels in [-1, 1]; about half of them are mirrored
    from flowback.data.images import to_model

    for batch in first:
        assert torch.equal(batch.x, to_model(batch.pixels)) and batch.pixels.shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        ShardBatches(rgb_shards, "train", 8, seed=1, segment=4, world=3)


def test_ranks_take_their_parts_of_the_same_global_batch():
    images = torch.arange(20 * 1 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(20, 1, 4, 4)
    whole = MemoryBatches(images, torch.arange(20), batch_size=8, seed=0).get(5)
    parts = [MemoryBatches(images, torch.arange(20), batch_size=8, seed=0, rank=r, world=2).get(5) for r in range(2)]
    assert torch.equal(torch.cat([p.index for p in parts]), whole.index)
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)


def test_latent_batches_take_the_stored_view_and_flip_its_pixels(tmp_path):
    from flowback.data.latents import npy_bytes
    from flowback.data.format import encode_png, sample_key, write_samples

    g = np.random.default_rng(0)
    d = tmp_path / "lat"
    d.mkdir()
    mean = g.standard_normal((16, 2, 4, 2, 2)).astype(np.float16)
    pixels = g.integers(0, 256, (16, 3, 16, 16), dtype=np.uint8)
    write_samples(d / "train-000000.tar", [
        {"__key__": sample_key("train", i), "png": encode_png(pixels[i]), "mean.npy": npy_bytes(mean[i]),
         "std.npy": npy_bytes(np.ones_like(mean[i])), "cls": str(i % 4).encode()} for i in range(16)])
    from flowback.io import sha256_file

    write_manifest(d, {"dataset": "imagenet", "image_size": 16, "channels": 3, "num_classes": 4,
                       "members": ["png", "mean.npy", "std.npy", "cls"], "latent_shape": [2, 4, 2, 2],
                       "splits": {"train": {"count": 16, "per_class": [4] * 4, "shards": [
                           {"name": "train-000000.tar", "count": 16, "sha256": sha256_file(d / "train-000000.tar")}]}}})
    sb = ShardBatches(d, "train", 16, seed=0, segment=10, workers=0, shuffle_buffer=0)
    batch = sb.get(0)
    flips = 0
    for x, px in zip(batch.x, batch.pixels):
        i = next(i for i in range(16) if torch.equal(torch.from_numpy(mean[i, 0]).float(), x)
                 or torch.equal(torch.from_numpy(mean[i, 1]).float(), x))
        flipped = torch.equal(torch.from_numpy(mean[i, 1]).float(), x)
        flips += flipped
        expect = torch.from_numpy(pixels[i]).flip(-1) if flipped else torch.from_numpy(pixels[i])
        assert torch.equal(px, expect)  # the encoder sees the image the latent encodes
    assert 0 < flips < 16


def test_bf16_autocast_trains_and_differs_from_float32(tmp_path):
    images = torch.randint(0, 256, (16, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    f32 = train(experiment(3), MemoryBatches(images, labels, 8, 0), tmp_path / "a.pt", fingerprint(experiment(3)), CPU, show_progress=False)
    bf16 = train(experiment(3, dtype="bfloat16"), MemoryBatches(images, labels, 8, 0), tmp_path / "b.pt", fingerprint(experiment(3, dtype="bfloat16")), CPU,
                 show_progress=False)
    assert all(np.isfinite(r["loss"]) for r in bf16.log)
    # step 1 is exact in both (zero-initialised outputs: z = x); after two updates: close, but computed in bfloat16
    assert abs(bf16.log[-1]["loss"] - f32.log[-1]["loss"]) < 0.05
    assert bf16.log[-1]["loss"] != f32.log[-1]["loss"]


def _tiny_params(d: Path, steps: int, **train) -> Path:
    return tiny_params(d, model={"blocks": 2}, train={"steps": steps, "checkpoint_every": 4, **train},
                       experiments={"baseline": {"strategy": "none"}, "rrepa": {"strategy": "reverse", "position": "2"}},
                       sample={"per_class": 6, "batch_size": 10},  # 60 images in 6 chunks
                       sweep={"scales": []})  # sampling at the fixed weight, without a sweep stage first


def _run(*args):
    r = command("-m", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _same_weights(wa: dict, wb: dict, what) -> None:
    for k in wa:  # the same global batches; only the order of the gradient sums differs
        a, b = wa[k], wb[k]
        if k.endswith("qkv.bias"):
            # the key bias has an exactly zero gradient (softmax ignores a shift shared by all keys); Adam turns
            # rounding noise of ~1e-9 there into steps of ~lr: compare the query and value parts only
            a, b = torch.cat([a.chunk(3)[0], a.chunk(3)[2]]), torch.cat([b.chunk(3)[0], b.chunk(3)[2]])
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (what, k, (a - b).abs().max())


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_sample_what_one_process_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        params = _tiny_params(d, 6)
        _run("flowback", "stage", "prepare", "--params", str(params), "--quiet")
        _run("flowback", "stage", "encoder", "--params", str(params), "--quiet")
    # a resume state no rank can read: only rank 0 sets it aside (the others would fail to rename it), and every rank
    # starts from the step rank 0 broadcasts
    junk = two / "results" / "runs" / "rrepa-s0" / ".resume" / "state.pt"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a checkpoint")
    for run in ("baseline-s0", "rrepa-s0"):
        _run("flowback", "stage", "train", run, "--params", str(one / "params.yaml"), "--quiet")
        r = _run("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flowback", "stage", "train", run, "--params",
                 str(two / "params.yaml"), "--quiet")
        wa = load_torch(one / "results" / "runs" / run / "model.pt")["weights"]
        wb = load_torch(two / "results" / "runs" / run / "model.pt")["weights"]
        _same_weights(wa, wb, run)
        assert load_json(two / "results" / "runs" / run / "train_timing.json")["processes"] == 2
        log = (two / "results" / "runs" / run / "train_log.csv").read_text().splitlines()
        assert log[0].startswith("step,") and len(log) == 7  # one row per step, no duplicates
    assert (two / "results" / "runs" / "rrepa-s0" / ".resume" / "state.pt.corrupt").exists()
    assert r.stdout.count("cannot be read") <= 1

    # sampling sharded over two ranks (chunks 0, 2, 4 and 1, 3, 5) gives the one-process images, from the same model
    import shutil

    shutil.copy(one / "results" / "runs" / "baseline-s0" / "model.pt",
                two / "results" / "runs" / "baseline-s0" / "model.pt")
    _run("flowback", "stage", "sample", "baseline-s0", "--params", str(one / "params.yaml"), "--quiet")
    _run("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flowback", "stage", "sample", "baseline-s0", "--params",
         str(two / "params.yaml"), "--quiet")
    sa = np.load(one / "results" / "runs" / "baseline-s0" / "samples.npz")
    sb = np.load(two / "results" / "runs" / "baseline-s0" / "samples.npz")
    assert sb["arr_0"].shape == (60, 16, 16, 1) and np.array_equal(sa["arr_1"], sb["arr_1"])
    assert np.array_equal(sa["arr_0"], sb["arr_0"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_a_c10d_rendezvous_train_what_one_process_does(tmp_path):
    """`torchrun --nnodes 2` as two local "nodes" (one rank each, gloo), meeting at a c10d rendezvous on localhost,
    with gradient accumulation on each rank (micro-batch 2 of the per-rank 4)."""
    import subprocess
    import sys

    from conftest import ROOT

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        _run("flowback", "stage", "prepare", "--params", str(_tiny_params(d, 5, micro_batch=2)), "--quiet")
    _run("flowback", "stage", "train", "baseline-s0", "--params", str(one / "params.yaml"), "--quiet")
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "flowback-test",
           "-m", "flowback", "stage", "train", "baseline-s0", "--params", str(two / "params.yaml"), "--quiet"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    wa = load_torch(one / "results" / "runs" / "baseline-s0" / "model.pt")["weights"]
    wb = load_torch(two / "results" / "runs" / "baseline-s0" / "model.pt")["weights"]
    _same_weights(wa, wb, "two nodes")
    timing = load_json(two / "results" / "runs" / "baseline-s0" / "train_timing.json")
    assert timing["processes"] == 2 and timing["accumulation"] == 2


def test_the_training_log_is_rewritten_from_the_resume_state(tmp_path):
    """train_log.csv is rewritten whole at every log step from the state's log: a resumed run never shows the steps
    lost after its last checkpoint twice."""
    from flowback.io import save_csv

    images = torch.randint(0, 256, (16, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = tmp_path / "train_log.csv"

    def crash_at_5(step):
        if step == 5:
            raise Crash

    exp = experiment(6)
    with pytest.raises(Crash):
        train(exp, MemoryBatches(images, torch.arange(16) % 10, 8, 0), tmp_path / "s.pt", fingerprint(exp), CPU, show_progress=False,
              on_step=crash_at_5, on_log=lambda log: save_csv(path, log))
    assert [line.split(",")[0] for line in path.read_text().splitlines()] == ["step", "1", "2", "3", "4", "5"]
    train(exp, MemoryBatches(images, torch.arange(16) % 10, 8, 0), tmp_path / "s.pt", fingerprint(exp), CPU, show_progress=False,
          on_log=lambda log: save_csv(path, log))
    assert [line.split(",")[0] for line in path.read_text().splitlines()] == ["step", "1", "2", "3", "4", "5", "6"]
