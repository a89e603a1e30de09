"""A resumable, multi-process, multi-rank engine that writes a split's shards, and the in-memory writer of the
embedded default data set.

A split is cut into `ShardJob`s (a source range and a digest of everything the shard is made from). `write_jobs`
makes the missing ones (in worker processes, or one rank's share under torchrun), recording each finished shard's
digest and sha256 in a progress file updated atomically; a killed run, run again, reuses exactly the shards whose
digest and sha256 still match and ends with the same files as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..io import FlowBackFileError, load_json, save_json, sha256_file
from .format import FORMAT, MODES, encode_png, sample_key, shard_name, write_samples


def _progress_path(directory: Path, split: str) -> Path:
    return directory / f".progress-{split}.json"


def _input_digest(images: np.ndarray, labels: np.ndarray, first_index: int, split: str) -> str:
    """What a shard is made of; a stored shard is reused only if it was made from exactly this."""
    h = hashlib.sha256(f"{FORMAT}|{split}|{first_index}|{images.shape}|{images.dtype}|{labels.dtype}|".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


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
