"""ImageNet data side on a synthetic ImageNet-shaped source: prepare (folders and official tars), crops, skips,
resume after kill -9, corruption reports, latent shards (one and two ranks), the streaming DDP loader."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stage
from PIL import Image

from flowback.data import sources
from flowback.data.loader import epoch_batches, make_loader
from flowback.data.manifest import read_latents, read_split, verify, write_manifest
from flowback.data.transforms import adm_crop, crop_square, decode_rgb, tarflow_crop
from flowback.io import FlowBackFileError, load_json, sha256_file

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 9, 3


def _image(rng: np.random.Generator, i: int) -> Image.Image:
    w, h = int(rng.integers(36, 140)), int(rng.integers(36, 140))
    base = rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    arr = np.kron(base, np.ones((4, 4, 1), np.uint8))[:h, :w]  # blocky: survives JPEG, so crops are distinct
    im = Image.fromarray(arr)
    if i % 7 == 3:
        im = im.convert("L")  # ImageNet has grayscale JPEGs
    if i % 7 == 5:
        im = im.convert("CMYK")  # ... and CMYK ones
    return im


def make_source(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    i = 0
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(WNIDS):
            d = root / split / wnid
            d.mkdir(parents=True)
            for k in range(n):
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * n + k + 1:08d}.JPEG"
                _image(rng, i).save(d / name, quality=90)
                i += 1
    return root


def make_tars(folder: Path, out: Path) -> Path:
    """The official layout: a train tar of per-class tars, a flat val tar and a labels file."""
    out.mkdir()
    with tarfile.open(out / sources.TRAIN_TAR, "w") as outer:
        for wnid in WNIDS:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted((folder / "train" / wnid).iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    lines = ["ImageId,PredictionString"]
    with tarfile.open(out / sources.VAL_TAR, "w") as val:
        for f in sorted((folder / "val").glob("*/*.JPEG"), key=lambda f: f.name):
            val.add(f, arcname=f.name)
            lines.append(f"{f.stem},{f.parent.name} 1 2 3 4")
    (out / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("imagenet"))


def params_file(tmp_path: Path, source: Path, **data) -> Path:
    data = {"dataset": "imagenet", "source": str(source), "root": str(tmp_path / "data"), "image_size": 16,
            "classes": len(WNIDS), "shard_size": 8, "workers": 2, **data}
    text = ("data: {" + ", ".join(f"{k}: {v}" for k, v in data.items()) + "}\nmodel: {patch_size: 2}\n"
            f"results: {tmp_path / 'results'}\n")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def run_prepare(path: Path) -> subprocess.CompletedProcess:
    """The stage as users run it: its own process, exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "flowback", "stage", "prepare", "--params", str(path), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def prepare_here(path: Path, capsys) -> tuple[int, str, str]:
    """The stage in this process (faster than a subprocess when it needs no process of its own)."""
    try:
        stage("prepare", path)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    stage("prepare", params_file(tmp, source))  # in this process: the data, not the command line, is under test
    return tmp / "data" / "imagenet"


def _shard_hashes(directory: Path) -> dict:
    m = load_json(directory / "manifest.json")
    return {split: [(s["name"], s["sha256"]) for s in e["shards"]] for split, e in m["splits"].items()}


# ---------------------------------------------------------------------------------------------------- sources
def test_folder_listing_is_sorted_labelled_and_limited(source):
    wnids, refs = sources.list_imagenet(source, 4)
    assert wnids == WNIDS
    assert [len(refs["train"]), len(refs["val"])] == [36, 12]
    assert [r.label for r in refs["train"]] == sorted(r.label for r in refs["train"])
    assert all(r.name.startswith(WNIDS[r.label]) for r in refs["train"])
    _, limited = sources.list_imagenet(source, 4, max_per_class=2)
    assert np.bincount([r.label for r in limited["val"]]).tolist() == [2, 2, 2, 2]
    with pytest.raises(FlowBackFileError, match="has 4 train classes, params expect 1000"):
        sources.list_imagenet(source, 1000)


def test_tar_layout_lists_the_same_bytes_as_folders(source, tmp_path):
    tars = make_tars(source, tmp_path / "tars")
    assert sources.layout(tars) == "tars" and sources.layout(source) == "folders"
    _, from_folders = sources.list_imagenet(source, 4)
    _, from_tars = sources.list_imagenet(tars, 4)
    for split in ("train", "val"):
        a, b = from_folders[split], from_tars[split]
        assert [r.label for r in a] == [r.label for r in b]
        assert [r.read() for r in a] == [r.read() for r in b]  # byte ranges inside (nested) tars


def test_val_labels_file_errors_name_file_and_member(source, tmp_path):
    tars = make_tars(source, tmp_path / "tars")
    csv = tars / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace(f",{WNIDS[2]} ", ",n99999999 ", 1))
    with pytest.raises(FlowBackFileError, match=r"ILSVRC2012_img_val.tar: member .* is labelled 'n99999999'"):
        sources.list_imagenet(tars, 4)
    csv.unlink()
    with pytest.raises(FlowBackFileError, match="needs a labels file"):
        sources.list_imagenet(tars, 4)
    with pytest.raises(FlowBackFileError, match="not an ImageNet source"):
        sources.list_imagenet(tmp_path, 4)


# ------------------------------------------------------------------------------------------------------ crops
def test_tarflow_crop_is_torchvision_resize_then_center_crop():
    from torchvision import transforms

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    ref = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])(im)
    assert np.array_equal(np.asarray(tarflow_crop(im, 32)), np.asarray(ref))


def test_adm_crop_follows_its_definition():
    # 600 x 256 -> box-halved once (256 >= 2 * 64 twice: 300 x 128 -> 150 x 64), then no bicubic change of size
    arr = np.zeros((256, 600, 3), np.uint8)
    arr[:, 300:] = 200  # right half bright: the centre crop must straddle the edge at its middle
    out = np.asarray(adm_crop(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    assert (out[:, :31] == 0).all() and (out[:, 33:] == 200).all()
    # a constant image stays constant through box and bicubic filters
    flat = np.asarray(adm_crop(Image.new("RGB", (333, 517), (10, 20, 30)), 48))
    assert flat.shape == (48, 48, 3) and (flat == [10, 20, 30]).all()
    with pytest.raises(ValueError, match="unknown resize method"):
        crop_square(Image.new("RGB", (8, 8)), 8, "nearest")


# ---------------------------------------------------------------------------------------------------- prepare
def test_prepare_round_trips_every_image_exactly(prepared, source):
    manifest = load_json(prepared / "manifest.json")
    assert manifest["wnids"] == WNIDS and manifest["resize"] == "tarflow" and manifest["image_size"] == 16
    _, refs = sources.list_imagenet(source, 4)
    for split in ("train", "val"):
        images, labels = read_split(prepared, split)
        expected = np.stack([crop_square(decode_rgb(r.read()), 16, "tarflow") for r in refs[split]])
        assert np.array_equal(images, expected)
        assert labels.tolist() == [r.label for r in refs[split]]
    summary = verify(prepared)
    assert summary["train"]["per_class"] == [TRAIN_PER_CLASS] * 4 and summary["val"]["shards"] == 2


def test_tar_source_gives_the_same_shards(source, prepared, tmp_path, capsys):
    tars = make_tars(source, tmp_path / "tars")
    code, _, err = prepare_here(params_file(tmp_path, tars, workers=1), capsys)
    assert code == 0, err
    assert _shard_hashes(tmp_path / "data" / "imagenet") == _shard_hashes(prepared)


@pytest.mark.slow
def test_kill_9_while_writing_shards_resumes_to_the_same_manifest(source, prepared, tmp_path):
    params = params_file(tmp_path, source, workers=1, shard_size=2)  # 18 + 6 shards, one at a time
    out = tmp_path / "data" / "imagenet"
    # the stage with every shard write slowed to 0.2 s, so the kill lands mid-way however fast the machine is
    slow = ("import time, flowback.data.imagenet as m; w = m.write_samples; "
            "m.write_samples = lambda *a, **k: (time.sleep(0.2), w(*a, **k)); "
            f"from flowback.runner import main; main('prepare', None, {str(params)!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("train-*.tar")))
    assert 3 <= written < 18 and not (out / "manifest.json").exists(), "the kill should land mid-way"
    r = run_prepare(params)
    assert r.returncode == 0, r.stderr
    assert run_prepare(_fresh(tmp_path / "refrun", source, workers=2, shard_size=2)).returncode == 0
    a, b = load_json(out / "manifest.json"), load_json(tmp_path / "refrun" / "data" / "imagenet" / "manifest.json")
    assert a["splits"] == b["splits"]  # same shards, same hashes: no duplicate and no missing image
    assert verify(out)["train"]["count"] == 36
    assert not list(out.glob(".*.tmp"))


def _fresh(tmp: Path, source: Path, **data) -> Path:
    tmp.mkdir()
    return params_file(tmp, source, **data)


def test_undecodable_image_is_named_or_skipped_and_counted(source, tmp_path, capsys):
    import shutil

    broken = tmp_path / "src"
    shutil.copytree(source, broken)
    bad = broken / "train" / WNIDS[1] / f"{WNIDS[1]}_4.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    (broken / "train" / WNIDS[2] / "notes.JPEG").write_bytes(b"this is not an image")
    code, _, err = prepare_here(params_file(tmp_path, broken, workers=1), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{bad}: image does not decode" in err and "skip_undecodable" in err

    code, out, err = prepare_here(params_file(tmp_path, broken, workers=1, skip_undecodable="true"), capsys)
    assert code == 0, err
    assert "train: 35 samples in 5 shards, 2 undecodable sources skipped" in out
    out = tmp_path / "data" / "imagenet"
    manifest = load_json(out / "manifest.json")
    assert manifest["splits"]["train"]["skipped"] == 2
    names = sorted(x["name"] for s in manifest["splits"]["train"]["shards"] for x in s.get("skipped", []))
    assert names == [f"{WNIDS[1]}/{WNIDS[1]}_4.JPEG", f"{WNIDS[2]}/notes.JPEG"]
    images, labels = read_split(out, "train")
    assert len(images) == 35 and np.bincount(labels).tolist() == [9, 8, 9, 9]
    # skipped keys are gaps, not renumbering: the key is the source's index in the sorted listing
    keys = [b for batch in make_loader(out, "train", 8, resampled=False) for b in batch["key"]]
    assert len(keys) == 35 == len(set(keys)) and "train-0000013" not in keys and "train-0000027" not in keys


def test_corrupted_imagenet_shard_names_shard_and_sample(prepared, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(prepared, d)
    shard = d / "train-000002.tar"
    with tarfile.open(shard) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + 40: member.offset_data + 60] = b"\0" * 20  # inside the PNG: the tar stays valid
    shard.write_bytes(bytes(data))
    with pytest.raises(FlowBackFileError, match="train-000002.tar: sha256"):
        verify(d)
    m = load_json(d / "manifest.json")
    m["splits"]["train"]["shards"][2]["sha256"] = sha256_file(shard)
    write_manifest(d, {k: v for k, v in m.items() if k != "format"})
    key = Path(member.name).stem
    with pytest.raises(FlowBackFileError, match=rf"train-000002.tar: sample '{key}': PNG does not decode"):
        verify(d)
    with pytest.raises(FlowBackFileError, match=rf"train-000002.tar: sample '{key}'"):
        for _ in make_loader(d, "train", 4, resampled=False):
            pass
    # a truncated shard read by the streaming loader: an error naming the shard, not a shorter epoch
    (d / "train-000001.tar").write_bytes((d / "train-000001.tar").read_bytes()[:1500])
    with pytest.raises(FlowBackFileError, match=r"train-000001.tar"):  # cut inside a sample: its .png is missing
        for _ in make_loader(d, "train", 4, resampled=False):
            pass


# ----------------------------------------------------------------------------------------------------- loader
def test_loader_epoch_length_determinism_and_rank_split(prepared):
    assert epoch_batches(36, 2, 4) == 4
    a = make_loader(prepared, "train", 4, rank=0, world=2, workers=2, seed=3)
    b = make_loader(prepared, "train", 4, rank=0, world=2, workers=2, seed=3)
    c = make_loader(prepared, "train", 4, rank=1, world=2, workers=2, seed=3)
    keys = lambda loader: [k for batch in loader for k in batch["key"]]  # noqa: E731
    ka, kb, kc = keys(a), keys(b), keys(c)
    assert len(ka) == len(kc) == 16 and len(a) == 4  # the same number of steps on every rank
    assert ka == kb and ka != kc  # deterministic, and ranks draw differently
    a.set_epoch(1)
    assert keys(a) != ka  # another epoch, another draw
    batch = next(iter(a))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].dtype == torch.int64


def test_sharded_evaluation_reads_every_sample_exactly_once(prepared):
    seen = []
    for rank in range(2):
        loader = make_loader(prepared, "train", 5, rank=rank, world=2, workers=2, resampled=False)
        seen += [k for batch in loader for k in batch["key"]]
    assert sorted(seen) == [f"train-{i:07d}" for i in range(36)]


def test_loader_refuses_a_planted_pickle(prepared, tmp_path):
    import pickle
    import shutil

    from flowback.data.format import write_samples

    d = tmp_path / "copy"
    shutil.copytree(prepared, d)
    write_samples(d / "val-000000.tar", [{"__key__": "val-0000000", "cls": b"0", "png": b"x",
                                         "pyd": pickle.dumps({"boom": 1})}])
    with pytest.raises(FlowBackFileError, match="pickle-type member"):
        next(iter(make_loader(d, "val", 1, resampled=False)))


# ---------------------------------------------------------------------------------------------------- latents
@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from flowback.models.vae import save_random_vae

    return save_random_vae(tmp_path_factory.mktemp("vae") / "vae", block_out_channels=(8, 16, 16))


def _latent_params(tmp_path: Path, source: Path, vae: Path):
    from flowback.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text(f"data: {{dataset: imagenet, source: {source}, root: {tmp_path / 'data'}, image_size: 32, "
                    f"classes: 4, shard_size: 10, workers: 2, format: latent, resize: adm, encode_batch_size: 7}}\n"
                    f"model: {{patch_size: 1, latent: {{vae_dir: {vae}}}}}\nruntime: {{device: cpu, threads: 1}}\n"
                    f"results: {tmp_path / 'results'}\n")
    return path, load_params(path)


def test_latent_shards_hold_mean_and_std_of_image_and_flip(source, vae_dir, tmp_path, one_thread):
    from flowback.data.latents import encode_dataset
    from flowback.models.vae import LatentCodec, load_vae

    _, params = _latent_params(tmp_path, source, vae_dir)
    summary = encode_dataset(params, show_progress=False)
    assert summary["train"]["count"] == 36 and summary["val"]["per_class"] == [3] * 4
    out = tmp_path / "data" / "imagenet"
    manifest = load_json(out / "manifest.json")
    assert manifest["members"] == ["png", "mean.npy", "std.npy", "cls"] and manifest["latent_shape"] == [2, 4, 8, 8]
    lat = read_latents(out, "val")
    _, refs = sources.list_imagenet(source, 4)
    crops = torch.from_numpy(np.stack([crop_square(decode_rgb(r.read()), 32, "adm") for r in refs["val"]]))
    assert torch.equal(torch.from_numpy(read_split(out, "val")[0]), crops)  # keep_pixels: the encoder's input
    codec = LatentCodec(load_vae(vae_dir), 0.18215, batch_size=7)  # as encode_batch_size: same batches, same bits
    x = crops.float() / 127.5 - 1
    mean, std = codec.encode_with_std(x)
    mean_flip, _ = codec.encode_with_std(x.flip(-1))
    tol = dict(atol=2e-3, rtol=2e-3)  # float16 storage
    assert torch.allclose(torch.from_numpy(lat["mean"][:, 0]).float(), mean, **tol)
    assert torch.allclose(torch.from_numpy(lat["mean"][:, 1]).float(), mean_flip, **tol)
    assert torch.allclose(torch.from_numpy(lat["std"][:, 0]).float(), std, **tol) and (lat["std"] > 0).all()
    assert not torch.allclose(mean, mean_flip)  # the flip really is another view
    assert lat["label"].tolist() == [r.label for r in refs["val"]]
    # two ranks, each its own shards (simulated in one process) -> the same manifest
    from flowback.data.imagenet import make_jobs
    from flowback.data.latents import LatentShardBuilder
    from flowback.data.writer import collect_entries, write_jobs

    other = tmp_path / "ranks"
    settings = {"image_size": 32, "resize": "adm", "skip_undecodable": False, "keep_pixels": True}
    jobs = make_jobs("train", refs["train"], 10, settings)
    build = LatentShardBuilder(codec, torch.device("cpu"), 2)
    mine = [write_jobs(other, "train", jobs, build, rank=r, world=2, show_progress=False) for r in range(2)]
    assert [e["name"] for e in mine[0]] == ["train-000000.tar", "train-000002.tar"]
    assert [e["name"] for e in mine[1]] == ["train-000001.tar", "train-000003.tar"]
    entries = collect_entries(other, "train", jobs)
    assert [e["sha256"] for e in entries] == [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    assert not list(other.glob(".progress-train.rank*.json"))

    # a sample whose array has the wrong dtype or shape is an error naming shard and sample
    from flowback.data.latents import npy_bytes
    from flowback.data.format import encode_png, write_samples

    shard = out / "val-000001.tar"
    png = encode_png(np.zeros((3, 32, 32), np.uint8))
    write_samples(shard, [{"__key__": "val-0000010", "mean.npy": npy_bytes(np.zeros((2, 4, 8, 8), np.float32)),
                           "std.npy": npy_bytes(np.ones((2, 4, 8, 8), np.float16)), "cls": b"3", "png": png},
                          {"__key__": "val-0000011", "mean.npy": npy_bytes(np.zeros((4, 8, 8), np.float16)),
                           "std.npy": npy_bytes(np.ones((2, 4, 8, 8), np.float16)), "cls": b"3", "png": png}])
    manifest["splits"]["val"]["shards"][1]["sha256"] = sha256_file(shard)
    write_manifest(out, manifest)
    with pytest.raises(FlowBackFileError, match=r"val-000001.tar: sample 'val-0000010': .mean.npy is float32 "
                                                r"\[2, 4, 8, 8\], expected float16 \[2, 4, 8, 8\]"):
        verify(out)


def test_latent_format_needs_a_vae():
    from flowback.params import ParamsError, validate

    with pytest.raises(ParamsError, match="data.format 'latent' needs model.latent"):
        validate({"data": {"dataset": "imagenet", "source": "/x", "format": "latent"}})
    with pytest.raises(ParamsError, match="needs data.source"):
        validate({"data": {"dataset": "imagenet"}})


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_process_writes(source, vae_dir, tmp_path, one_thread):
    from flowback.data.latents import encode_dataset

    (tmp_path / "one").mkdir()
    _, params = _latent_params(tmp_path / "one", source, vae_dir)
    encode_dataset(params, show_progress=False)
    two = tmp_path / "two"
    two.mkdir()
    path2, _ = _latent_params(two, source, vae_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flowback", "stage", "prepare",
                        "--params", str(path2), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_json(tmp_path / "one" / "data" / "imagenet" / "manifest.json")
    b = load_json(two / "data" / "imagenet" / "manifest.json")
    assert a["splits"] == b["splits"] and b["latent_shape"] == [2, 4, 8, 8]
    assert not list((two / "data" / "imagenet").glob(".progress-*.rank*.json"))  # merged by rank 0


def test_data_verify_command(prepared, tmp_path, capsys):
    from flowback.cli import main

    params = prepared.parent.parent / "params.yaml"
    assert main(["data", "verify", "--params", str(params)]) == 0
    assert "train: 36 samples in 5 shards verified" in capsys.readouterr().out
    other = tmp_path / "params.yaml"
    other.write_text(params.read_text().replace("image_size: 16", "image_size: 16, resize: adm"))
    assert main(["data", "verify", "--params", str(other)]) == 2
    err = capsys.readouterr().err
    assert "prepared with other settings" in err and "resize: 'tarflow' != params 'adm'" in err


def test_decoder_stage_fine_tunes_the_vae_that_sampling_then_decodes_with(source, vae_dir, tmp_path, one_thread):
    """decoder.enabled (STARFlow): the stage trains only the decoder side on noisy latents, saves a VAE that sample
    loads instead of model.latent.vae_dir, and sampling then skips the denoising step."""
    import json

    import yaml

    from flowback.builders import flow_config
    from flowback.checkpoints import save_flow
    from flowback.models.tarflow import FlowConfig, TARFlow
    from flowback.models.vae import load_vae, save_random_vae

    vae_dir = save_random_vae(tmp_path / "sd_like", block_out_channels=(8, 8, 8, 8))  # factor 8, as SD's VAE
    path, params = _latent_params(tmp_path, source, vae_dir)
    raw = yaml.safe_load(path.read_text())
    raw["decoder"] = {"enabled": True, "dir": str(tmp_path / "decoder"), "steps": 3, "batch_size": 4,
                      "warmup_steps": 1, "lpips_weight": 0.0, "convnext_weight": 0.0, "gan_weight": 0.0,
                      "checkpoint_every": 2}
    raw["sample"] = {"per_class": 1, "batch_size": 4}
    raw["experiments"] = {"flow": {"strategy": "none"}}
    path.write_text(yaml.safe_dump(raw))
    stage("prepare", path)
    stage("decoder", path)
    tuned, original = load_vae(tmp_path / "decoder"), load_vae(vae_dir)
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])}
    assert changed and all(n.startswith(("decoder.", "post_quant_conv.")) for n in changed)
    report = json.loads((tmp_path / "decoder" / "metrics.json").read_text())
    assert report["steps"] == 3 and report["before"]["mse"] > 0 and not (tmp_path / "decoder" / ".resume" / "state.pt").exists()

    from flowback.params import load_params

    p = load_params(path)
    torch.manual_seed(0)
    save_flow(p.run_dir("flow-s0") / "model.pt", TARFlow(FlowConfig(**flow_config(p.run("flow-s0").params).to_dict())))
    stage("sample", path, "flow-s0")
    sample = json.loads((p.run_dir("flow-s0") / "sample.json").read_text())
    assert sample["decoder"] is True and sample["denoise"] is False
