"""The embedded digits data, the stratified split, and the WebDataset shards (atomic, resumable, pickle-free)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import command, stage
from PIL import Image

from flowback.data import writer
from flowback.data.digits import load_digits_images, stratified_split
from flowback.data.format import encode_png
from flowback.data.manifest import load_split, read_split, verify, write_manifest
from flowback.data.writer import write_split
from flowback.io import FlowBackFileError, load_json, save_json, sha256_file
from flowback.params import validate



@pytest.fixture(scope="module")
def digits16():
    return load_digits_images(16)


def _write_dataset(directory: Path, images: np.ndarray, labels: np.ndarray, shard_size: int) -> dict:
    n_val = len(images) // 5
    splits = {"train": write_split(directory, "train", images[n_val:], labels[n_val:], shard_size,
                                   show_progress=False, num_classes=10),
              "val": write_split(directory, "val", images[:n_val], labels[:n_val], shard_size,
                                 show_progress=False, num_classes=10)}
    write_manifest(directory, {"dataset": "digits", "image_size": images.shape[-1], "channels": images.shape[1],
                               "num_classes": 10, "splits": splits})
    return splits


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def small(tmp_path, digits16):
    """A 300-image data set in 16x16, 60 per shard: train 240 (4 shards), val 60 (1 shard)."""
    images, labels = digits16[0][:300], digits16[1][:300]
    d = tmp_path / "small"
    _write_dataset(d, images, labels, 60)
    return d, images, labels


def _set_shard(directory: Path, name: str, data: bytes, update_manifest: bool = True) -> Path:
    """Replace a shard's bytes; with update_manifest the manifest's sha256 is made to match (so only the
    decoding/count checks stand between the bad bytes and the caller)."""
    path = directory / name
    path.write_bytes(data)
    if update_manifest:
        manifest = load_json(directory / "manifest.json")
        for entry in manifest["splits"].values():
            for shard in entry["shards"]:
                if shard["name"] == name:
                    shard["sha256"] = sha256_file(path)
        save_json(directory / "manifest.json", manifest)
    return path


def _shard_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- digits/split
def test_digits_loader_shapes_range_and_labels(digits16):
    images, labels = digits16
    assert images.shape == (1797, 1, 16, 16) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(10))
    assert images.min() == 0 and images.max() >= 250  # full 0..255 range is used
    assert 20 < images.mean() < 120  # mostly dark background, bright strokes


def test_digits_native_size_is_exact_rescale():
    from sklearn.datasets import load_digits

    images, labels = load_digits_images(8)
    raw = load_digits().images
    assert images.shape == (1797, 1, 8, 8)
    expected = np.floor(raw * 255 / 16 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(images[:, 0], expected)
    assert expected[raw == 16].min() == 255 and expected[raw == 8].min() == 128  # half rounds up
    with pytest.raises(ValueError):
        load_digits_images(7)


def test_digits_upsampling_is_bicubic_and_deterministic(digits16):
    images8, _ = load_digits_images(8)
    again, _ = load_digits_images(16)
    np.testing.assert_array_equal(again, digits16[0])
    ref = np.asarray(Image.fromarray(images8[5, 0]).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(digits16[0][5, 0], ref)
    assert not np.array_equal(digits16[0][5, 0], np.kron(images8[5, 0], np.ones((2, 2), np.uint8)))


def test_split_is_stratified_disjoint_sorted_and_deterministic(digits16):
    labels = digits16[1]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    counts = np.bincount(labels, minlength=10)
    val_counts = np.bincount(labels[val], minlength=10)
    np.testing.assert_array_equal(val_counts, np.floor(counts * 0.2 + 0.5).astype(int))
    t2, v2 = stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(train, t2)
    np.testing.assert_array_equal(val, v2)
    _, v3 = stratified_split(labels, 0.2, seed=1)
    assert not np.array_equal(val, v3)
    assert len(v3) == len(val)


# -------------------------------------------------------------------------------------------------- write / read
def test_round_trip_is_bit_identical(small):
    d, images, labels = small
    n_val = len(images) // 5
    tr_x, tr_y = read_split(d, "train")
    va_x, va_y = read_split(d, "val")
    assert tr_x.dtype == np.uint8 and tr_y.dtype == np.int64 and tr_x.shape == (240, 1, 16, 16)
    np.testing.assert_array_equal(tr_x, images[n_val:])
    np.testing.assert_array_equal(tr_y, labels[n_val:])
    np.testing.assert_array_equal(va_x, images[:n_val])
    np.testing.assert_array_equal(va_y, labels[:n_val])


def test_rgb_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 3, 12, 12), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    entry = write_split(tmp_path, "train", images, labels, 3, show_progress=False)
    assert entry["per_class"] == [2, 2, 3] and [s["count"] for s in entry["shards"]] == [3, 3, 1]
    write_manifest(tmp_path, {"dataset": "x", "image_size": 12, "channels": 3, "num_classes": 3,
                              "splits": {"train": entry}})
    x, y = read_split(tmp_path, "train")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert Image.open(io.BytesIO(encode_png(images[0]))).mode == "RGB"


def test_manifest_counts_and_hashes(small):
    d, images, labels = small
    manifest = load_json(d / "manifest.json")
    assert (manifest["dataset"], manifest["image_size"], manifest["channels"], manifest["num_classes"]) == \
        ("digits", 16, 1, 10)
    train = manifest["splits"]["train"]
    assert train["count"] == 240 and [s["count"] for s in train["shards"]] == [60] * 4
    assert [s["name"] for s in train["shards"]] == [f"train-{k:06d}.tar" for k in range(4)]
    assert train["per_class"] == np.bincount(labels[60:], minlength=10).tolist()
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            assert s["sha256"] == sha256_file(d / s["name"])
    # sample layout inside a shard: key.cls (ASCII) and key.png, nothing else
    import tarfile

    with tarfile.open(d / "val-000000.tar") as tf:
        names = tf.getnames()
        assert names[:2] == ["val-0000000.cls", "val-0000000.png"] and len(names) == 120
        assert tf.extractfile("val-0000003.cls").read() == str(labels[3]).encode()
    summary = verify(d)
    assert summary["train"]["count"] == 240 and summary["val"]["shards"] == 1


def test_rewrite_is_reproducible(tmp_path, digits16):
    images, labels = digits16[0][:150], digits16[1][:150]
    _write_dataset(tmp_path / "a", images, labels, 40)
    _write_dataset(tmp_path / "b", images, labels, 40)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, digits16, monkeypatch):
    images, labels = digits16[0][:300], digits16[1][:300]
    ref = tmp_path / "ref"
    _write_dataset(ref, images, labels, 50)

    d = tmp_path / "killed"
    real = writer._write_shard
    calls = []

    def dies_on_fourth(*args, **kw):
        calls.append(args[0].name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the run is "killed" while writing train-000003.tar
        return real(*args, **kw)

    monkeypatch.setattr(writer, "_write_shard", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        _write_dataset(d, images, labels, 50)
    monkeypatch.setattr(writer, "_write_shard", real)
    assert not (d / "train-000003.tar").exists() and not (d / "manifest.json").exists()
    assert sorted(load_json(d / ".progress-train.json")["shards"]) == [f"train-{k:06d}.tar" for k in range(3)]
    # what a kill -9 could leave or what could happen to the disk meanwhile:
    (d / ".train-000003.tar.x1y2z3.tmp").write_bytes(b"half a shard")  # stale temp file
    data = (d / "train-000001.tar").read_bytes()
    (d / "train-000001.tar").write_bytes(data[: len(data) // 2])  # a damaged shard
    (d / "train-000007.tar").write_bytes(b"junk from an older layout")
    inode0 = (d / "train-000000.tar").stat().st_ino

    calls.clear()
    monkeypatch.setattr(writer, "_write_shard", lambda *a, **k: (calls.append(a[0].name), real(*a, **k)))
    _write_dataset(d, images, labels, 50)
    assert _files(d) == _files(ref)
    assert "train-000000.tar" not in calls and (d / "train-000000.tar").stat().st_ino == inode0  # reused
    assert calls[:3] == ["train-000001.tar", "train-000003.tar", "train-000004.tar"]  # damaged + unwritten

    # a run with nothing to do writes nothing and changes nothing
    calls.clear()
    _write_dataset(d, images, labels, 50)
    assert calls == [] and _files(d) == _files(ref)


def test_changed_inputs_are_rewritten_not_reused(tmp_path, digits16):
    images, labels = digits16[0][:100], digits16[1][:100]
    write_split(tmp_path, "train", images, labels, 40, show_progress=False)
    flipped = images.copy()
    flipped[0] = 255 - flipped[0]
    entry = write_split(tmp_path, "train", flipped, labels, 40, show_progress=False, num_classes=10)
    write_manifest(tmp_path, {"dataset": "digits", "image_size": 16, "channels": 1, "num_classes": 10,
                              "splits": {"train": entry}})
    np.testing.assert_array_equal(read_split(tmp_path, "train")[0], flipped)
    # a smaller layout removes the shards it no longer has
    write_split(tmp_path, "train", images[:30], labels[:30], 40, show_progress=False)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar"]


# ---------------------------------------------------------------------------------------------- hostile shards
class _Payload:
    """Unpickling this object creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sample(key: str, image: np.ndarray, label: int, **extra) -> dict:
    return {"__key__": key, "png": encode_png(image), "cls": str(label).encode(), **extra}


def test_pickle_entry_is_refused_without_unpickling(small, tmp_path):
    d, images, labels = small
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()  # the payload works: unpickling it does create its marker

    marker = tmp_path / "unpickled-marker"
    samples = [_sample(f"val-{i:07d}", images[i], int(labels[i])) for i in range(60)]
    samples[7]["pyd"] = pickle.dumps(_Payload(marker))
    _set_shard(d, "val-000000.tar", _shard_bytes(samples))
    with pytest.raises(FlowBackFileError, match=r"val-000000\.tar.*val-0000007.*unpickle"):
        read_split(d, "val")
    with pytest.raises(FlowBackFileError, match=r"val-000000\.tar"):
        verify(d)
    assert not marker.exists()
    # the library's own decoder would have run the payload; ours never hands the bytes to pickle
    for ext in ("pickle", "pth", "txt"):
        samples = [_sample(f"val-{i:07d}", images[i], int(labels[i])) for i in range(60)]
        samples[3][ext] = pickle.dumps(_Payload(marker))
        _set_shard(d, "val-000000.tar", _shard_bytes(samples))
        with pytest.raises(FlowBackFileError, match=r"val-000000\.tar.*val-0000003.*(unpickle|unknown entry)"):
            read_split(d, "val")
    assert not marker.exists()


@pytest.mark.parametrize("bad, message", [
    ({"cls": b"10"}, "out of range"),
    ({"cls": b"-1"}, "not an ASCII decimal"),
    ({"cls": b"seven"}, "not an ASCII decimal"),
    ({"png": b"\x89PNG\r\n\x1a\n-not-really"}, "does not decode"),
    ({"png": encode_png(np.zeros((1, 8, 8), np.uint8))}, "expected 16x16"),
    ({"png": encode_png(np.zeros((3, 16, 16), np.uint8))}, "mode 'RGB'"),
    ({"npy": b"\x93NUMPY-garbage"}, "npy"),
])
def test_bad_samples_name_shard_and_key(small, bad, message):
    d, images, labels = small
    samples = [_sample(f"train-{60 + i:07d}", images[60 + i], int(labels[60 + i])) for i in range(60)]
    samples[11].update(bad)
    _set_shard(d, "train-000001.tar", _shard_bytes(samples))
    with pytest.raises(FlowBackFileError, match=rf"train-000001\.tar.*train-0000071.*{message}"):
        read_split(d, "train")


def test_missing_or_renamed_samples_are_errors(small):
    d, images, labels = small
    samples = [_sample(f"train-{60 + i:07d}", images[60 + i], int(labels[60 + i])) for i in range(60)]
    _set_shard(d, "train-000001.tar", _shard_bytes(samples[:-1]))
    with pytest.raises(FlowBackFileError, match=r"train-000001\.tar.*59 samples.*says 60"):
        read_split(d, "train")
    samples[5]["__key__"] = "train-0009999"
    _set_shard(d, "train-000001.tar", _shard_bytes(samples))
    with pytest.raises(FlowBackFileError, match=r"train-000001\.tar.*unexpected keys \['train-0009999'\]"):
        read_split(d, "train")
    del samples[5]["png"]
    samples[5]["__key__"] = "train-0000065"
    _set_shard(d, "train-000001.tar", _shard_bytes(samples))
    with pytest.raises(FlowBackFileError, match=r"train-000001\.tar.*train-0000065.*missing '\.png'"):
        read_split(d, "train")


def _member_offsets(path: Path) -> list[tuple[str, int, int]]:
    import tarfile

    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data) for m in tf.getmembers()]


@pytest.mark.parametrize("where", ["mid-member", "member-boundary", "mid-header", "sample-boundary"])
def test_truncated_shard_names_the_shard(small, where):
    d, _, _ = small
    name = "train-000002.tar"
    data = (d / name).read_bytes()
    manifest_bytes = (d / "manifest.json").read_bytes()
    offsets = _member_offsets(d / name)
    _, header, body = offsets[41]  # a .png member in the middle of the shard
    # tarfile ends quietly at a cut on a header boundary: then only the sample and count checks notice
    cut = {"mid-member": body + 100, "member-boundary": header, "mid-header": header + 200,
           "sample-boundary": offsets[40][1]}[where]
    # with the manifest's sha256 updated too, the decoder and the count check must still refuse it
    _set_shard(d, name, data[:cut])
    with pytest.raises(FlowBackFileError, match=rf"{name}"):
        read_split(d, "train")
    # and with the manifest's original hash, the hash check names it before anything is decoded
    (d / "manifest.json").write_bytes(manifest_bytes)
    with pytest.raises(FlowBackFileError, match=rf"{name}.*sha256"):
        read_split(d, "train")


@pytest.mark.parametrize("target", ["png-header", "tar-header-name", "tar-header-size", "png-data"])
def test_corrupted_byte_names_the_shard(small, target):
    d, _, _ = small
    name = "val-000000.tar"
    data = bytearray((d / name).read_bytes())
    offsets = _member_offsets(d / name)
    _, header, body = offsets[21]  # val-0000010.png
    pos = {"png-header": body + 16, "tar-header-name": header + 5, "tar-header-size": header + 124 + 5,
           "png-data": body + 60}[target]
    data[pos] ^= 0x5A
    for update_manifest in (True, False):
        _set_shard(d, name, bytes(data), update_manifest=update_manifest)
        with pytest.raises(FlowBackFileError, match=rf"{name}"):
            read_split(d, "val")


def test_verify_catches_changed_shard(small):
    d, _, labels = small
    assert verify(d)["val"]["per_class"] == np.bincount(labels[:60], minlength=10).tolist()
    name = "train-000003.tar"
    data = bytearray((d / name).read_bytes())
    _, _, body = _member_offsets(d / name)[0]  # the first .cls member
    old = labels[180]
    data[body] = ord(str((old + 1) % 10))  # a different but perfectly valid label
    (d / name).write_bytes(bytes(data))
    with pytest.raises(FlowBackFileError, match=rf"{name}.*sha256"):
        verify(d)
    (d / name).unlink()
    with pytest.raises(FlowBackFileError, match=rf"{name}.*missing"):
        verify(d)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FlowBackFileError, match="manifest.json"):
        read_split(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ prepare stage
def test_prepare_stage_end_to_end(tmp_path, digits16, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"data: {{root: {tmp_path / 'data'}, image_size: 16, shard_size: 500}}\n"
                           f"results: {tmp_path / 'results'}\n")
    stage("prepare", params_file)
    out = capsys.readouterr().out
    assert "train: 1438 samples in 3 shards" in out and "val: 359 samples in 1 shards" in out

    d = tmp_path / "data" / "digits"
    manifest = load_json(d / "manifest.json")
    assert manifest["dataset"] == "digits" and manifest["image_size"] == 16 and manifest["split_seed"] == 0
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 1797
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [500, 500, 438]

    params = validate({"data": {"root": str(tmp_path / "data"), "image_size": 16, "shard_size": 500}})
    images, labels = digits16
    train_idx, val_idx = stratified_split(labels, 0.2, 0)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        x, y = load_split(params, split)
        np.testing.assert_array_equal(x, images[idx])
        np.testing.assert_array_equal(y, labels[idx])

    other = validate({"seed": 3, "data": {"root": str(tmp_path / "data"), "image_size": 16}})
    with pytest.raises(FlowBackFileError, match="split_seed.*re-run"):
        load_split(other, "train")

    before = _files(d)
    stage("prepare", params_file)  # a second run is a verified no-op
    assert _files(d) == before


@pytest.mark.slow
def test_prepare_stage_errors_cleanly_and_repairs_damage(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: {image_size: 4}\n")
    r = command("-m", "flowback", "stage", "prepare", "--params", str(bad))
    assert r.returncode == 2
    assert "data.image_size" in r.stderr and "Traceback" not in r.stderr
    # damaged data: re-running the stage repairs it (only the damaged shard is rewritten)
    good = tmp_path / "good.yaml"
    good.write_text(f"data: {{root: {tmp_path / 'data'}, image_size: 8, shard_size: 1000}}\n"
                    f"results: {tmp_path / 'results'}\n")
    stage("prepare", good)
    d = tmp_path / "data" / "digits"
    before = _files(d)
    shard = d / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(FlowBackFileError, match="val-000000.tar"):
        verify(d)
    stage("prepare", good)
    assert _files(d) == before
