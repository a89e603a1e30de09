"""Paper-scale training paths on CPU: DDP (2 gloo ranks) == 1 process, streamed shards resume exactly, latent
batches with flips, bf16 autocast, dvclive curves without duplicated steps after a resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flowback.data.batches import MemoryBatches, ShardBatches
from flowback.data.shards import write_manifest, write_split
from flowback.io import load_json, load_torch
from flowback.params import validate
from flowback.training import train

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


def experiment(steps=6, strategy="none", position=None, **train_kw):
    raw = {
        "data": {"image_size": 16},
        "model": {"patch_size": 4, "width": 16, "blocks": 2, "layers": 1, "head_dim": 8, "mlp_ratio": 1},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 3,
                  "log_every": 1, "threads": 1, **train_kw},
        "align": {"projector_dim": 16},
        "experiments": {"e": {"strategy": strategy, **({"position": position} if position else {})}},
    }
    return validate(raw).experiment("e")


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
    return validate(raw).experiment("e")


def test_streamed_training_resumes_exactly_at_a_checkpoint(rgb_shards, tmp_path):
    exp = _rgb_experiment(steps=7)

    def source():
        return ShardBatches(rgb_shards, "train", 8, seed=0, segment=3, workers=0, shuffle_buffer=16)

    full = train(exp, None, None, tmp_path / "a" / "state.pt", show_progress=False, batches=source())

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(exp, None, None, tmp_path / "b" / "state.pt", show_progress=False, batches=source(), on_step=crash_at_5)
    resumed = train(exp, None, None, tmp_path / "b" / "state.pt", show_progress=False, batches=source())
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
    mb = MemoryBatches(images, torch.arange(20), batch_size=8, seed=0)
    whole = mb.get(5)
    parts = [mb.get(5, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([p.index for p in parts]), whole.index)
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)


def test_latent_batches_take_the_stored_view_and_flip_its_pixels(tmp_path):
    from flowback.data.latents import npy_bytes
    from flowback.data.shards import encode_png, sample_key, write_samples

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
    f32 = train(experiment(3), images, labels, tmp_path / "a.pt", show_progress=False)
    bf16 = train(experiment(3, dtype="bfloat16"), images, labels, tmp_path / "b.pt", show_progress=False)
    assert all(np.isfinite(r["loss"]) for r in bf16.log)
    # step 1 is exact in both (zero-initialised outputs: z = x); after two updates: close, but computed in bfloat16
    assert abs(bf16.log[-1]["loss"] - f32.log[-1]["loss"]) < 0.05
    assert bf16.log[-1]["loss"] != f32.log[-1]["loss"]


def _tiny_params(d: Path, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["results"] = str(d / "results")
    raw["data"]["root"] = str(d / "data")
    raw["encoder"]["dir"] = str(d / "encoder")  # never the repository's own results/
    raw["metrics"]["dir"] = str(d / "metric")
    raw["model"].update(width=16, layers=1, head_dim=8, mlp_ratio=1, blocks=2)
    raw["train"].update(steps=steps, batch_size=8, warmup_steps=1, checkpoint_every=4, log_every=1, threads=1)
    raw["experiments"] = {"baseline": {"strategy": "none"}, "rrepa": {"strategy": "reverse", "position": "2"}}
    raw["sample"].update(per_class=6, batch_size=10, device="cpu")  # 60 images in 6 chunks
    raw["encoder"]["train"].update(steps=2)
    path = d / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(*args, env=None):
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_sample_what_one_process_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        params = _tiny_params(d, 6)
        _run("stages.prepare", "--params", str(params), "--quiet")
        _run("stages.encoder", "--params", str(params), "--quiet")
    for exp in ("baseline", "rrepa"):
        _run("stages.train", "--params", str(one / "params.yaml"), "--experiment", exp, "--quiet")
        _run("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stages.train", "--params",
             str(two / "params.yaml"), "--experiment", exp, "--quiet")
        wa = load_torch(one / "results" / "runs" / exp / "model.pt")["weights"]
        wb = load_torch(two / "results" / "runs" / exp / "model.pt")["weights"]
        for k in wa:  # the same global batches; only the order of the gradient sums differs
            a, b = wa[k], wb[k]
            if k.endswith("qkv.bias"):
                # the key bias has an exactly zero gradient (softmax ignores a shift shared by all keys); Adam turns
                # rounding noise of ~1e-9 there into steps of ~lr: compare the query and value parts only
                a, b = torch.cat([a.chunk(3)[0], a.chunk(3)[2]]), torch.cat([b.chunk(3)[0], b.chunk(3)[2]])
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (exp, k, (a - b).abs().max())
        assert load_json(two / "results" / "runs" / exp / "train.json")["processes"] == 2
        log = (two / "results" / "runs" / exp / "dvclive" / "plots" / "metrics" / "train" / "bpd.tsv").read_text()
        assert log.splitlines()[0] == "step\tbpd" and len(log.splitlines()) == 7  # one row per step, no duplicates

    # sampling sharded over two ranks (chunks 0, 2, 4 and 1, 3, 5) gives the one-process images, from the same model
    import shutil

    shutil.copy(one / "results" / "runs" / "baseline" / "model.pt", two / "results" / "runs" / "baseline" / "model.pt")
    _run("stages.sample", "--params", str(one / "params.yaml"), "--experiment", "baseline", "--quiet")
    _run("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stages.sample", "--params",
         str(two / "params.yaml"), "--experiment", "baseline", "--quiet")
    sa = np.load(one / "results" / "runs" / "baseline" / "samples.npz")
    sb = np.load(two / "results" / "runs" / "baseline" / "samples.npz")
    assert sb["arr_0"].shape == (60, 16, 16, 1) and np.array_equal(sa["arr_1"], sb["arr_1"])
    assert np.array_equal(sa["arr_0"], sb["arr_0"])


def test_dvclive_log_is_rebuilt_on_resume(tmp_path):
    from stages.train import LiveLog

    live = LiveLog(tmp_path / "dvclive", images_per_row=8)
    rows = [{"step": s, "loss": 1.0 / s, "bpd": 2.0, "align": 0.0, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 6)]
    for k in range(1, 6):
        live(rows[:k])  # a run that logged steps 1..5, then was killed after its checkpoint at step 3
    live.live = None  # killed: never closed
    resumed = LiveLog(tmp_path / "dvclive", images_per_row=8)
    for k in range(4, 7):  # the resumed process continues from the state's log (steps 1..3)
        resumed((rows[:3] + [dict(rows[0], step=s) for s in range(4, 7)])[:k])
    resumed.close()
    tsv = (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in tsv] == ["step", "1", "2", "3", "4", "5", "6"]
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "images_per_second.tsv").exists()
    assert load_json(tmp_path / "dvclive" / "metrics.json")["step"] == 6 and not resumed.failed


def test_a_failing_logger_does_not_stop_training(tmp_path, capsys):
    from stages.train import LiveLog

    live = LiveLog(tmp_path / "dvclive", images_per_row=8)
    live._open = lambda: (_ for _ in ()).throw(FileNotFoundError("DVCLIVE_STEP_COMPLETED"))
    images = torch.randint(0, 256, (16, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    result = train(experiment(3), images, torch.arange(16) % 10, tmp_path / "s.pt", show_progress=False, on_log=live)
    assert result.steps == 3 and len(result.log) == 3 and live.failed
    assert capsys.readouterr().out.count("dvclive logging stopped") == 1
