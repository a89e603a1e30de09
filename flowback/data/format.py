"""The shard format: WebDataset tars of PNG (or float16 .npy latent) samples with ASCII labels, written with
reproducible tar headers and read back without any unpickling.

A sample is `{split}-{index:07d}.cls` (the label as ASCII decimal) and `{split}-{index:07d}.png` (mode "L" for one
channel, "RGB" for three), or `mean.npy`/`std.npy` for VAE latents; `index` is the sample's position among the split's
sources, so key order is split order. Tar headers carry a fixed mtime/owner, so the same inputs give byte-identical
shards (and the same sha256 in the manifest).

Reading never calls webdataset's `.decode()`: its default decoders unpickle `.pyd`/`.pickle` members. `decode_sample`
accepts only png, cls and npy (with allow_pickle=False), and `member_filter` refuses a tar member without an extension
(webdataset would silently drop it); anything else is an error naming the shard and the sample. The streaming loader
(flowback/data/loader.py) uses the same two rules.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..io import FlowBackFileError, atomic_path

FORMAT = "flowback-wds-1"
SPLITS = ("train", "val")
MODES = {1: "L", 3: "RGB"}
META_KEYS = frozenset({"__key__", "__url__", "__local_path__"})  # added by webdataset itself, not read from the tar
DATA_KEYS = frozenset({"png", "cls", "npy", "mean.npy", "std.npy"})
IMAGE_MEMBERS = ("png", "cls")  # pixel shards; latent shards hold ("mean.npy", "std.npy", "cls")
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "torch", "joblib"})
_TAR_TIME = 0  # fixed header mtime: reproducible shards


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


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


def write_samples(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Atomically write one shard from {"__key__": key, ext: bytes, ...} dicts, with reproducible tar headers."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            import webdataset as wds  # imports torch: only for reading and writing shards

            with wds.TarWriter(f, encoder=False, mtime=_TAR_TIME, user="flowback", group="flowback") as w:
                for sample in samples:
                    w.write(sample)




class BadMember(Exception):
    """A tar member FlowBack will not read; raised inside webdataset's tar iteration, whose exception handling
    rewrites other exceptions' arguments, so it carries its message in `.message`."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def member_filter(where: str | Path) -> Callable[[str], bool]:
    """webdataset's `select_files`: refuses a member without an extension instead of silently dropping it."""

    def select(fname: str) -> bool:
        if "." not in fname.rsplit("/", 1)[-1]:
            raise BadMember(f"{where}: member {fname!r} has no extension; refusing an unknown entry")
        return True

    return select


def decode_sample(sample: dict[str, Any], shard: str | Path, *, num_classes: int, image_size: int | None = None,
                  channels: int | None = None, members: tuple[str, ...] = IMAGE_MEMBERS) -> dict[str, Any]:
    """A raw webdataset sample (bytes per extension) -> {"key", "label" (int), "image" (uint8 CHW), [".npy" arrays]}.

    Only png, cls and *.npy members are accepted; anything else (.pyd, .pickle, .pth, ...) is refused before it
    could be deserialised, and .npy is loaded with allow_pickle=False. `members` must all be present. Every failure
    is a FlowBackFileError naming the shard and the sample key.
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
    for ext in members:
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

    if "png" in sample:
        out["image"] = _decode_png(sample["png"], where, image_size, channels)
    for ext in sample:
        if ext.endswith("npy") and ext in DATA_KEYS:
            try:
                out[ext] = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
            except Exception as e:
                raise FlowBackFileError(f"{where}: .{ext} entry does not load without pickle ({type(e).__name__}: "
                                        f"{e})") from e
    return out


def _decode_png(data: bytes, where: str, image_size: int | None, channels: int | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
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
    return np.ascontiguousarray(arr)


def read_shard(path: str | Path, *, num_classes: int, image_size: int | None = None,
               channels: int | None = None, members: tuple[str, ...] = IMAGE_MEMBERS) -> list[dict[str, Any]]:
    """Decode every sample of one shard, in tar order, through webdataset without its decoders."""
    path = Path(path)
    if not path.is_file():
        raise FlowBackFileError(f"{path}: shard not found")

    import webdataset as wds

    ds = wds.WebDataset([str(path)], shardshuffle=False, handler=wds.reraise_exception, empty_check=False,
                        nodesplitter=None, workersplitter=None, select_files=member_filter(path))
    samples = []
    it = iter(ds)
    while True:
        try:
            raw = next(it)
        except StopIteration:
            break
        except BadMember as e:
            raise FlowBackFileError(e.message) from None
        except Exception as e:  # tarfile.ReadError, ValueError (duplicate member), OSError...
            detail = str(e.args[0]) if e.args else ""
            raise FlowBackFileError(f"{path}: truncated or corrupted shard ({type(e).__name__}: "
                                    f"{detail.split(' @ ')[0]})") from e
        samples.append(decode_sample(raw, path, num_classes=num_classes, image_size=image_size, channels=channels,
                                     members=members))
    return samples
