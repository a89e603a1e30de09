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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
DATA_KEYS = frozenset({"png", "cls", "npy", "mean.npy", "std.npy"})
IMAGE_MEMBERS = ("png", "cls")  # pixel shards; latent shards hold ("mean.npy", "std.npy", "cls")
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


def write_samples(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Atomically write one shard from {"__key__": key, ext: bytes, ...} dicts, with reproducible tar headers."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=_TAR_TIME, user="flowback", group="flowback") as w:
                for sample in samples:
                    w.write(sample)


def _write_shard(path: Path, split: str, first_index: int, images: np.ndarray, labels: np.ndarray) -> None:
    write_samples(path, ({"__key__": sample_key(split, first_index + i), "png": encode_png(image),
                          "cls": str(int(label)).encode("ascii")} for i, (image, label) in enumerate(zip(images, labels))))


def _remove_stale(directory: Path, split: str, keep: Iterable[str], own: Iterable[str]) -> None:
    """Remove temp files a killed run left of the shards we make (`own`), and shards the layout no longer has."""
    for name in own:
        for tmp in directory.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    for tmp in directory.glob(f"..progress-{split}*.json.*.tmp"):
        tmp.unlink(missing_ok=True)
    keep = set(keep)
    for old in directory.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in keep:
            old.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardJob:
    """One shard to make: sources `first` .. `first + size - 1` of the split, described by `digest`.

    `payload` is whatever the build function needs (image refs, array slices); it must pickle when workers > 0.
    """

    name: str
    first: int
    size: int
    digest: str
    payload: Any = None


def _progress_files(directory: Path, split: str) -> list[Path]:
    return [_progress_path(directory, split), *sorted(directory.glob(f".progress-{split}.rank*.json"))]


def _load_progress(directory: Path, split: str) -> dict[str, dict]:
    """Shard records of every progress file of the split (one per rank in a multi-process run), merged.

    A record is only a claim: it is trusted only when the digest matches the job and the file's sha256 matches."""
    done: dict[str, dict] = {}
    for path in _progress_files(directory, split):
        try:
            progress = load_json(path) if path.exists() else {}
        except FlowBackFileError:
            progress = {}  # unreadable progress: nothing in it is trusted, its shards are rewritten
        shards = progress.get("shards", {}) if isinstance(progress, dict) else {}
        if isinstance(shards, dict):
            done.update({k: v for k, v in shards.items() if isinstance(v, dict)})
    return done


def _reusable(directory: Path, job: ShardJob, prev: dict | None) -> bool:
    path = directory / job.name
    return (isinstance(prev, dict) and prev.get("input") == job.digest and path.is_file()
            and sha256_file(path) == prev.get("sha256") and isinstance(prev.get("skipped", []), list))


def _entry(job: ShardJob, record: dict) -> dict:
    entry = {"name": job.name, "count": record["count"], "sha256": record["sha256"]}
    if record.get("skipped"):
        entry["skipped"] = record["skipped"]
    return entry


def write_jobs(directory: str | Path, split: str, jobs: list[ShardJob], build: Callable[[ShardJob, Path], list],
               workers: int = 0, show_progress: bool = True, start_method: str = "forkserver",
               rank: int = 0, world: int = 1) -> list[dict]:
    """Make the shards of a split; returns the manifest's shard entries, in order.

    `build(job, path)` writes the shard atomically at `path` and returns the skipped sources as
    [{"index", "name", "error"}]; with `workers` > 1 it runs in that many processes (it and the jobs must pickle),
    else in this process.
    With `world` > 1 this process makes only jobs[rank::world] and returns only their entries; once every rank is
    done, `collect_entries` gives the whole list.
    Resumable: a shard is reused when a progress file says it was made from the same `digest` and its sha256 still
    matches. The progress file is updated atomically after each shard, so a run killed at any point and run again
    ends with the same files as an uninterrupted run.
    """
    from ..progress import progress as tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mine = jobs[rank::world]
    _remove_stale(directory, split, [j.name for j in jobs], [j.name for j in mine])
    progress_file = _progress_path(directory, split) if world == 1 else directory / f".progress-{split}.rank{rank}.json"
    known = _load_progress(directory, split)
    done = {j.name: known[j.name] for j in mine if _reusable(directory, j, known.get(j.name))}

    def record(job: ShardJob, skipped: list) -> None:
        done[job.name] = {"count": job.size - len(skipped), "sha256": sha256_file(directory / job.name),
                          "input": job.digest}
        if skipped:
            done[job.name]["skipped"] = skipped
        save_json(progress_file, {"format": FORMAT, "split": split, "shards": done})

    todo = [j for j in mine if j.name not in done]
    total = sum(j.size for j in mine)
    bar = tqdm(total=total, initial=total - sum(j.size for j in todo), desc=f"shards {split}", unit="img",
               disable=not show_progress)
    if workers > 1 and len(todo) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        # forkserver: a plain fork of a process that already ran torch/OpenMP threads can hang
        with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context(start_method)) as pool:
            futures = {pool.submit(build, job, directory / job.name): job for job in todo}
            try:
                for fut in cf.as_completed(futures):
                    job = futures[fut]
                    record(job, fut.result())
                    bar.update(job.size)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        for job in todo:
            record(job, build(job, directory / job.name))
            bar.update(job.size)
    bar.close()
    # Keep only this layout's records, so the final progress file is the same however we got here.
    save_json(progress_file, {"format": FORMAT, "split": split, "shards": {j.name: done[j.name] for j in mine}})
    return [_entry(j, done[j.name]) for j in mine]


def collect_entries(directory: str | Path, split: str, jobs: list[ShardJob]) -> list[dict]:
    """After a multi-rank write: every job's entry from the ranks' progress files (checked), merged into one file."""
    directory = Path(directory)
    known = _load_progress(directory, split)
    missing = [j.name for j in jobs if not _reusable(directory, j, known.get(j.name))]
    if missing:
        raise FlowBackFileError(f"{directory}: shards {missing[:3]} of split {split!r} were not written (a rank "
                                f"failed?); run the same command again to finish them")
    save_json(_progress_path(directory, split),
              {"format": FORMAT, "split": split, "shards": {j.name: known[j.name] for j in jobs}})
    for path in _progress_files(directory, split)[1:]:
        path.unlink(missing_ok=True)
    return [_entry(j, known[j.name]) for j in jobs]


def split_entry(entries: list[dict], labels_written: np.ndarray, num_classes: int) -> dict:
    """The manifest entry of a split: counts (written and skipped), per-class counts, shards."""
    skipped = sum(len(e.get("skipped", [])) for e in entries)
    entry = {"count": int(sum(e["count"] for e in entries)),
             "per_class": np.bincount(np.asarray(labels_written, np.int64), minlength=num_classes).tolist(),
             "shards": entries}
    if skipped:
        entry["skipped"] = skipped
    return entry


def write_split(directory: str | Path, split: str, images_u8_nchw: np.ndarray, labels: np.ndarray, shard_size: int,
                show_progress: bool = True, num_classes: int | None = None) -> dict:
    """Write in-memory images as one split's shards; returns its manifest entry {count, per_class, shards}.

    Resumable and reproducible as `write_jobs`: a shard is reused only if it was made from the same images and labels.
    """
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

    jobs = [ShardJob(shard_name(split, k), start, min(start + shard_size, len(images)) - start,
                     _input_digest(images[start:start + shard_size], labels[start:start + shard_size], start, split))
            for k, start in enumerate(range(0, len(images), shard_size))]

    def build(job: ShardJob, path: Path) -> list:
        stop = job.first + job.size
        _write_shard(path, split, job.first, images[job.first:stop], labels[job.first:stop])
        return []

    entries = write_jobs(directory, split, jobs, build, workers=0, show_progress=show_progress)
    return split_entry(entries, labels, num_classes)


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


class _BadMember(Exception):
    """Raised inside webdataset's tar iteration; carries our message past its exception-argument rewriting."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def read_shard(path: str | Path, *, num_classes: int, image_size: int | None = None,
               channels: int | None = None, members: tuple[str, ...] = IMAGE_MEMBERS) -> list[dict[str, Any]]:
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
        samples.append(decode_sample(raw, path, num_classes=num_classes, image_size=image_size, channels=channels,
                                     members=members))
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
                      and isinstance(s.get("sha256"), str) and "/" not in s["name"]
                      and all(isinstance(x, dict) and isinstance(x.get("index"), int) for x in s.get("skipped", []))
                      for s in entry["shards"]))
        if not ok:
            raise FlowBackFileError(f"{path}: split {split!r} is malformed (needs count and shards [{{name, count, "
                                    f"sha256}}])")
    return manifest


def shard_keys(split: str, first: int, shard: dict) -> list[str]:
    """The sample keys a manifest shard entry promises: its source range minus the sources it skipped."""
    skipped = {int(x["index"]) for x in shard.get("skipped", [])}
    return [sample_key(split, i) for i in range(first, first + shard["count"] + len(skipped)) if i not in skipped]


def members_of(manifest: dict) -> tuple[str, ...]:
    return tuple(manifest.get("members", IMAGE_MEMBERS))


def check_shard(directory: Path, manifest: dict, split: str, shard: dict, first: int) -> list[dict[str, Any]]:
    """Read one shard listed in the manifest: present, sha256, decodable, exactly the promised keys (sorted)."""
    path = directory / shard["name"]
    if not path.is_file():
        raise FlowBackFileError(f"{path}: shard listed in the manifest is missing")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        raise FlowBackFileError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                f"{shard['sha256'][:12]}... (changed or damaged; re-run `python -m stages.prepare`)")
    pixels = "png" in members_of(manifest)
    samples = read_shard(path, num_classes=manifest["num_classes"], image_size=manifest["image_size"] if pixels else None,
                         channels=manifest["channels"] if pixels else None, members=members_of(manifest))
    samples.sort(key=lambda s: s["key"])
    expected = shard_keys(split, first, shard)
    got = [s["key"] for s in samples]
    if got != expected:
        extra = sorted(set(got) - set(expected))[:3]
        missing = sorted(set(expected) - set(got))[:3]
        raise FlowBackFileError(f"{path}: has {len(got)} samples, the manifest says {len(expected)}"
                                f"{f'; unexpected keys {extra}' if extra else ''}"
                                f"{f'; missing keys {missing}' if missing else ''}")
    shape = manifest.get("latent_shape")
    for s in samples:
        for ext in members_of(manifest):
            if ext.endswith("npy") and (s[ext].dtype != np.float16 or list(s[ext].shape) != shape):
                raise FlowBackFileError(f"{path}: sample {s['key']!r}: .{ext} is {s[ext].dtype} {list(s[ext].shape)}, "
                                        f"expected float16 {shape}")
    return samples


def _read_samples(directory: Path, manifest: dict, split: str) -> list[dict[str, Any]]:
    if split not in manifest["splits"]:
        raise FlowBackFileError(f"{directory / MANIFEST}: no split {split!r}; has {', '.join(manifest['splits'])}")
    entry = manifest["splits"][split]
    samples: list[dict[str, Any]] = []
    first = 0
    for shard in entry["shards"]:
        samples += check_shard(directory, manifest, split, shard, first)
        first += shard["count"] + len(shard.get("skipped", []))
    if len(samples) != entry["count"]:
        raise FlowBackFileError(f"{directory / MANIFEST}: split {split!r} says {entry['count']} samples but its "
                                f"shards hold {len(samples)}")
    return samples


def _read_checked(directory: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    if "png" not in members_of(manifest):
        raise FlowBackFileError(f"{directory / MANIFEST}: holds {manifest.get('members')} samples, not images; "
                                f"read it with read_latents")
    samples = _read_samples(directory, manifest, split)
    size, channels = manifest["image_size"], manifest["channels"]
    out = np.stack([s["image"] for s in samples]) if samples else np.zeros((0, channels, size, size), np.uint8)
    return out, np.asarray([s["label"] for s in samples], dtype=np.int64)


def read_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split in key order: (uint8 images (N, C, S, S), int64 labels (N,)).

    Every shard is checked against manifest.json (sha256, count, keys) and decoded without unpickling.
    """
    directory = Path(directory)
    return _read_checked(directory, load_manifest(directory), split)


def read_latents(directory: str | Path, split: str) -> dict[str, np.ndarray]:
    """A latent split (stages.prepare with data.format latent) in key order, checked like read_split.

    Returns {"mean", "std": float16 (N, 2, C, h, w) - [:, 0] the image, [:, 1] its horizontal flip; "label": (N,)}.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    samples = _read_samples(directory, manifest, split)
    shape = manifest["latent_shape"]
    return {k: (np.stack([s[f"{k}.npy"] for s in samples]) if samples else np.zeros([0, *shape], np.float16))
            for k in ("mean", "std")} | {"label": np.asarray([s["label"] for s in samples], dtype=np.int64)}


def verify(directory: str | Path) -> dict:
    """Check every shard of every split: present, sha256, keys, decoding, per-class counts (by reading it all).

    Raises FlowBackFileError naming the first bad shard; returns {split: {count, skipped, shards, per_class}}.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    summary = {}
    for split, entry in manifest["splits"].items():
        labels = np.asarray([s["label"] for s in _read_samples(directory, manifest, split)], dtype=np.int64)
        per_class = np.bincount(labels, minlength=manifest["num_classes"]).tolist()
        if per_class != list(entry.get("per_class", [])):
            raise FlowBackFileError(f"{directory / MANIFEST}: split {split!r} per-class counts {per_class} do not "
                                    f"match the manifest's {entry.get('per_class')}")
        skipped = sum(len(s.get("skipped", [])) for s in entry["shards"])
        if skipped != entry.get("skipped", 0):
            raise FlowBackFileError(f"{directory / MANIFEST}: split {split!r} lists {skipped} skipped sources in its "
                                    f"shards but says {entry.get('skipped', 0)}")
        summary[split] = {"count": int(len(labels)), "skipped": skipped, "shards": len(entry["shards"]),
                          "per_class": per_class}
    return summary


def prepared_settings(params: "Params") -> dict:
    """The params a data directory is made from; the manifest records them and readers insist on them."""
    d = params.data
    want = {"dataset": d.dataset, "image_size": d.image_size, "channels": d.channels, "num_classes": d.num_classes}
    if d.dataset == "digits":
        want |= {"split_seed": params.seed, "val_fraction": d.val_fraction}
    else:
        want |= {"resize": d.resize, "format": d.format, "max_per_class": d.max_per_class}
    if d.format == "latent":
        want |= {"keep_pixels": d.keep_pixels}
    return want


def stale_settings(params: "Params", manifest: dict) -> list[str]:
    """How the manifest's recorded settings differ from `params` ("key: manifest != params"), empty if they agree."""
    return [f"{k}: {manifest.get(k)!r} != params {v!r}" for k, v in prepared_settings(params).items()
            if manifest.get(k) != v]


def check_prepared(params: "Params") -> dict:
    """The manifest of `params.data.dir`, or an error if the data was prepared with other settings."""
    d = params.data
    manifest = load_manifest(d.dir)
    stale = stale_settings(params, manifest)
    if stale:
        raise FlowBackFileError(f"{Path(d.dir) / MANIFEST}: prepared with other settings ({'; '.join(stale)}); "
                                f"re-run `python -m stages.prepare`")
    return manifest


def load_split(params: "Params", split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and int64 labels of `split` of the data set `params` describe (written by stages.prepare).

    Refuses data prepared with different settings (data set, image size, split seed or fraction, crop): re-run prepare.
    """
    return _read_checked(Path(params.data.dir), check_prepared(params), split)
