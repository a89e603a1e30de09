"""WebDataset shards of uint8 images, written atomically and resumably, read back without any unpickling.

Layout of a data directory (`params.data.dir`):

    manifest.json                 dataset, image_size, channels, num_classes, ..., splits: {split: entry}
    {split}-{shard:06d}.tar       WebDataset shards, `shard_size` samples each
    .progress-{split}.json        what has been written so far (makes a killed run resumable)

A sample is `{split}-{index:07d}.cls` (the label as ASCII decimal) and `{split}-{index:07d}.png` (mode "L" for one
channel, "RGB" for three); `index` is the sample's position in the split, so key order is split order. Tar headers
carry a fixed mtime/owner, so the same inputs give byte-identical shards (and the same sha256 in the manifest).

Reading never calls webdataset's `.decode()`: its default decoders unpickle `.pyd`/`.pickle` members. Our own
decoder accepts only png, cls and npy (with allow_pickle=False); anything else is refused with an error naming the
shard and the sample. Every shard's sha256, sample count and sample keys are checked against the manifest, so a
truncated or altered shard is an error (naming the shard), never a silently shorter data set.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import webdataset as wds
from PIL import Image

from ..io import FlowBackFileError, atomic_path, load_json, save_json, sha256_file

if TYPE_CHECKING:
    from ..params import Params

MANIFEST = "manifest.json"
FORMAT = "flowback-wds-1"
SPLITS = ("train", "val")
MODES = {1: "L", 3: "RGB"}
META_KEYS = frozenset({"__key__", "__url__", "__local_path__"})  # added by webdataset itself, not read from the tar
DATA_KEYS = frozenset({"png", "cls", "npy"})
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "torch", "joblib"})
_TAR_TIME = 0  # fixed header mtime: reproducible shards


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def _progress_path(directory: Path, split: str) -> Path:
    return directory / f".progress-{split}.json"


# ---------------------------------------------------------------------------------------------------------- write
def encode_png(image_chw: np.ndarray) -> bytes:
    """One uint8 CHW image (C = 1 or 3) -> PNG bytes (mode "L" or "RGB")."""
    if image_chw.dtype != np.uint8 or image_chw.ndim != 3 or image_chw.shape[0] not in MODES:
        raise ValueError(f"expected a uint8 (1|3, H, W) image, got {image_chw.dtype} {image_chw.shape}")
    hwc = np.ascontiguousarray(np.transpose(image_chw, (1, 2, 0)))
    im = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    assert im.mode == MODES[image_chw.shape[0]], im.mode
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _input_digest(images: np.ndarray, labels: np.ndarray, first_index: int, split: str) -> str:
    """What a shard is made of; a stored shard is reused only if it was made from exactly this."""
    h = hashlib.sha256(f"{FORMAT}|{split}|{first_index}|{images.shape}|{images.dtype}|{labels.dtype}|".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _write_shard(path: Path, split: str, first_index: int, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=_TAR_TIME, user="flowback", group="flowback") as w:
                for i, (image, label) in enumerate(zip(images, labels)):
                    w.write({"__key__": sample_key(split, first_index + i), "png": encode_png(image),
                             "cls": str(int(label)).encode("ascii")})


def _remove_stale(directory: Path, split: str, keep: Iterable[str]) -> None:
    """Remove temp files a killed run left behind, and shards of this split that the new layout no longer has."""
    for tmp in list(directory.glob(f".{split}-*.tmp")) + list(directory.glob(f"..progress-{split}.json.*.tmp")):
        tmp.unlink(missing_ok=True)
    keep = set(keep)
    for old in directory.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in keep:
            old.unlink()


def write_split(directory: str | Path, split: str, images_u8_nchw: np.ndarray, labels: np.ndarray, shard_size: int,
                show_progress: bool = True, num_classes: int | None = None) -> dict:
    """Write one split as shards; returns its manifest entry {count, per_class, shards: [{name, count, sha256}]}.

    Resumable: a shard is skipped when the progress file says it was made from the same images and labels and the
    file's sha256 still matches; anything else is (re)written atomically. The progress file is updated atomically
    after each shard, so a run killed at any point and run again ends with the same files as an uninterrupted run.
    """
    from ..progress import progress as tqdm

    directory = Path(directory)
    images = np.asarray(images_u8_nchw)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in MODES:
        raise ValueError(f"images must be uint8 (N, 1|3, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    labels = labels.astype(np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None and len(labels) else int(num_classes or 0)
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} is out of range for {num_classes} classes")

    directory.mkdir(parents=True, exist_ok=True)
    n = len(images)
    starts = list(range(0, n, shard_size))
    names = [shard_name(split, k) for k in range(len(starts))]
    _remove_stale(directory, split, names)

    progress_file = _progress_path(directory, split)
    try:
        progress = load_json(progress_file) if progress_file.exists() else {}
    except FlowBackFileError:
        progress = {}  # unreadable progress: nothing is trusted, everything is rewritten
    done: dict[str, dict] = progress.get("shards", {}) if isinstance(progress, dict) else {}
    if not isinstance(done, dict):
        done = {}

    entries = []
    bar = tqdm(total=n, desc=f"shards {split}", unit="img", disable=not show_progress)
    for name, start in zip(names, starts):
        stop = min(start + shard_size, n)
        digest = _input_digest(images[start:stop], labels[start:stop], start, split)
        path = directory / name
        prev = done.get(name)
        reusable = (isinstance(prev, dict) and prev.get("input") == digest and path.is_file()
                    and sha256_file(path) == prev.get("sha256"))
        if not reusable:
            _write_shard(path, split, start, images[start:stop], labels[start:stop])
            done[name] = {"count": stop - start, "sha256": sha256_file(path), "input": digest}
            save_json(progress_file, {"format": FORMAT, "split": split, "shards": done})
        entries.append({"name": name, "count": stop - start, "sha256": done[name]["sha256"]})
        bar.update(stop - start)
    bar.close()
    # Forget shards the new layout does not have, so the final progress file is the same however we got here.
    save_json(progress_file, {"format": FORMAT, "split": split, "shards": {e["name"]: done[e["name"]] for e in entries}})
    per_class = np.bincount(labels, minlength=num_classes).tolist() if n else [0] * num_classes
    return {"count": n, "per_class": per_class, "shards": entries}


def write_manifest(directory: str | Path, info: dict) -> Path:
    """Atomically write `manifest.json` (dataset, image_size, channels, num_classes, splits, and any extra keys)."""
    missing = [k for k in ("dataset", "image_size", "channels", "num_classes", "splits") if k not in info]
    if missing:
        raise ValueError(f"manifest info lacks {', '.join(missing)}")
    path = Path(directory) / MANIFEST
    for tmp in path.parent.glob(f".{MANIFEST}.*.tmp"):
        tmp.unlink(missing_ok=True)
    save_json(path, {"format": FORMAT, **info})
    return path


# ----------------------------------------------------------------------------------------------------------- read
def decode_sample(sample: dict[str, Any], shard: str | Path, *, num_classes: int, image_size: int | None = None,
                  channels: int | None = None) -> dict[str, Any]:
    """A raw webdataset sample (bytes per extension) -> {"key", "image" (uint8 CHW), "label" (int), ["npy"]}.

    Only png, cls and npy members are accepted; anything else (.pyd, .pickle, .pth, ...) is refused before it
    could be deserialised. Every failure is a FlowBackFileError naming the shard and the sample key.
    """
    key = sample.get("__key__", "?")
    where = f"{shard}: sample {key!r}"
    for ext in sample:
        if ext in META_KEYS or ext in DATA_KEYS:
            continue
        if ext.split(".")[-1].lower() in PICKLE_EXTS:
            raise FlowBackFileError(f"{where}: entry '.{ext}' is a pickle-type member; FlowBack refuses to "
                                    f"unpickle data files (only png, cls and npy are read)")
        raise FlowBackFileError(f"{where}: unknown entry '.{ext}'; FlowBack reads only png, cls and npy and refuses "
                                f"to unpickle or guess at anything else")
    for ext in ("png", "cls"):
        if ext not in sample:
            raise FlowBackFileError(f"{where}: missing '.{ext}' entry")

    out: dict[str, Any] = {"key": key}
    raw_cls = sample["cls"]
    if not isinstance(raw_cls, (bytes, bytearray)) or not re.fullmatch(rb"[0-9]{1,9}", bytes(raw_cls)):
        raise FlowBackFileError(f"{where}: label {bytes(raw_cls)[:20]!r} is not an ASCII decimal integer")
    label = int(raw_cls)
    if not 0 <= label < num_classes:
        raise FlowBackFileError(f"{where}: label {label} is out of range [0, {num_classes})")
    out["label"] = label

    try:
        with Image.open(io.BytesIO(sample["png"]), formats=["PNG"]) as im:
            if channels is not None and im.mode != MODES.get(channels):
                raise FlowBackFileError(f"{where}: PNG mode {im.mode!r}, expected {MODES.get(channels)!r}")
            if image_size is not None and im.size != (image_size, image_size):
                raise FlowBackFileError(f"{where}: PNG is {im.size[0]}x{im.size[1]}, expected "
                                        f"{image_size}x{image_size}")
            im.load()
            arr = np.asarray(im)
    except FlowBackFileError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... depending on the damage
        raise FlowBackFileError(f"{where}: PNG does not decode ({type(e).__name__}: {e})") from e
    arr = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
    if arr.dtype != np.uint8 or arr.shape[0] not in MODES:
        raise FlowBackFileError(f"{where}: image is {arr.dtype} {arr.shape}, expected uint8 with 1 or 3 channels")
    out["image"] = np.ascontiguousarray(arr)

    if "npy" in sample:
        try:
            out["npy"] = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        except Exception as e:
            raise FlowBackFileError(f"{where}: .npy entry does not load without pickle ({type(e).__name__}: "
                                    f"{e})") from e
    return out


class _BadMember(Exception):
    """Raised inside webdataset's tar iteration; carries our message past its exception-argument rewriting."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def read_shard(path: str | Path, *, num_classes: int, image_size: int | None = None,
               channels: int | None = None) -> list[dict[str, Any]]:
    """Decode every sample of one shard, in tar order, through webdataset without its decoders."""
    path = Path(path)
    if not path.is_file():
        raise FlowBackFileError(f"{path}: shard not found")

    def select(fname: str) -> bool:
        if "." not in fname.rsplit("/", 1)[-1]:  # webdataset would silently drop a member without an extension
            raise _BadMember(f"{path}: member {fname!r} has no extension; refusing an unknown entry")
        return True

    ds = wds.WebDataset([str(path)], shardshuffle=False, handler=wds.reraise_exception, empty_check=False,
                        nodesplitter=None, workersplitter=None, select_files=select)
    samples = []
    it = iter(ds)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            break
        except _BadMember as e:
            raise FlowBackFileError(e.message) from None
        except Exception as e:  # tarfile.ReadError, ValueError (duplicate member), OSError...
            detail = str(e.args[0]) if e.args else ""
            raise FlowBackFileError(f"{path}: truncated or corrupted shard ({type(e).__name__}: "
                                    f"{detail.split(' @ ')[0]})") from e
        samples.append(decode_sample(raw, path, num_classes=num_classes, image_size=image_size, channels=channels))
    return samples


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    manifest = load_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise FlowBackFileError(f"{path}: not a FlowBack data manifest (no 'splits')")
    for k in ("image_size", "channels", "num_classes"):
        if not isinstance(manifest.get(k), int):
            raise FlowBackFileError(f"{path}: '{k}' is missing or not an integer")
    for split, entry in manifest["splits"].items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("count"), int) and isinstance(entry.get("shards"), list)
              and all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
                      and isinstance(s.get("sha256"), str) and "/" not in s["name"] for s in entry["shards"]))
        if not ok:
            raise FlowBackFileError(f"{path}: split {split!r} is malformed (needs count and shards [{{name, count, "
                                    f"sha256}}])")
    return manifest


def _read_checked(directory: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in manifest["splits"]:
        raise FlowBackFileError(f"{directory / MANIFEST}: no split {split!r}; has {', '.join(manifest['splits'])}")
    entry = manifest["splits"][split]
    size, channels, num_classes = manifest["image_size"], manifest["channels"], manifest["num_classes"]
    images, labels = [], []
    index = 0
    for shard in entry["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            raise FlowBackFileError(f"{path}: shard listed in the manifest is missing")
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise FlowBackFileError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                    f"{shard['sha256'][:12]}... (changed or damaged; re-run `python -m stages.prepare`)")
        samples = read_shard(path, num_classes=num_classes, image_size=size, channels=channels)
        samples.sort(key=lambda s: s["key"])
        expected = [sample_key(split, i) for i in range(index, index + shard["count"])]
        got = [s["key"] for s in samples]
        if got != expected:
            extra = sorted(set(got) - set(expected))[:3]
            missing = sorted(set(expected) - set(got))[:3]
            raise FlowBackFileError(f"{path}: has {len(got)} samples, the manifest says {len(expected)}"
                                    f"{f'; unexpected keys {extra}' if extra else ''}"
                                    f"{f'; missing keys {missing}' if missing else ''}")
        images += [s["image"] for s in samples]
        labels += [s["label"] for s in samples]
        index += shard["count"]
    if index != entry["count"]:
        raise FlowBackFileError(f"{directory / MANIFEST}: split {split!r} says {entry['count']} samples but its "
                                f"shards hold {index}")
    out = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return out, np.asarray(labels, dtype=np.int64)


def read_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split in key order: (uint8 images (N, C, S, S), int64 labels (N,)).

    Every shard is checked against manifest.json (sha256, count, keys) and decoded without unpickling.
    """
    directory = Path(directory)
    return _read_checked(directory, load_manifest(directory), split)


def verify(directory: str | Path) -> dict:
    """Check every shard of every split: present, sha256, per-shard and per-class counts (by reading it).

    Raises FlowBackFileError naming the first bad shard; returns {split: {count, shards, per_class}}.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    summary = {}
    for split, entry in manifest["splits"].items():
        _, labels = _read_checked(directory, manifest, split)
        per_class = np.bincount(labels, minlength=manifest["num_classes"]).tolist()
        if per_class != list(entry.get("per_class", [])):
            raise FlowBackFileError(f"{directory / MANIFEST}: split {split!r} per-class counts {per_class} do not "
                                    f"match the manifest's {entry.get('per_class')}")
        summary[split] = {"count": int(len(labels)), "shards": len(entry["shards"]), "per_class": per_class}
    return summary


def load_split(params: "Params", split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and int64 labels of `split` of the data set `params` describe (written by stages.prepare).

    Refuses data prepared with different settings (data set, image size, split seed or fraction): re-run prepare.
    """
    d = params.data
    manifest = load_manifest(d.dir)
    want = {"dataset": d.dataset, "image_size": d.image_size, "channels": d.channels, "num_classes": d.num_classes,
            "split_seed": params.seed, "val_fraction": d.val_fraction}
    stale = [f"{k}: {manifest.get(k)!r} != params {v!r}" for k, v in want.items() if manifest.get(k) != v]
    if stale:
        raise FlowBackFileError(f"{Path(d.dir) / MANIFEST}: prepared with other settings ({'; '.join(stale)}); "
                                f"re-run `python -m stages.prepare`")
    return _read_checked(Path(d.dir), manifest, split)
