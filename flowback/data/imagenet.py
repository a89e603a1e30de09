"""ImageNet -> verified WebDataset shards of square uint8 PNGs (ImageNet 64 in the paper), in parallel and resumably.

Shard k of a split holds sources k*shard_size .. (k+1)*shard_size - 1 of the sorted source list
(flowback/data/sources.py); a sample's key is `{split}-{source index:07d}`, so keys never depend on which images
were skipped or in what order the workers finished. A shard's digest covers its sources (name, byte range, label)
and the crop settings, so a re-run reuses exactly the shards whose inputs did not change.

An image that does not decode is an error naming the file - or, with `data.skip_undecodable`, a skip recorded in
the manifest (which sources, why, and a per-split total), never a silent gap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..io import FlowBackFileError
from .writer import ShardJob, split_entry, write_jobs
from .format import encode_png, sample_key, shard_name, write_samples
from .sources import ImageRef
from .transforms import UndecodableImage, crop_square, decode_rgb

FORMAT = "flowback-imagenet-1"


def make_jobs(split: str, refs: list[ImageRef], shard_size: int, settings: dict) -> list[ShardJob]:
    """Cut a split's sources into shards; `settings` (crop, size, ...) is part of every shard's digest."""
    jobs = []
    for k, first in enumerate(range(0, len(refs), shard_size)):
        part = refs[first:first + shard_size]
        h = hashlib.sha256(f"{FORMAT}|{split}|{first}|{json.dumps(settings, sort_keys=True)}".encode())
        for r in part:
            h.update(f"{r.name}|{r.offset}|{r.size}|{r.label}\n".encode())
        jobs.append(ShardJob(shard_name(split, k), first, len(part), h.hexdigest(),
                             {"split": split, "refs": part, **settings}))
    return jobs


def load_image(ref: ImageRef, size: int, resize: str, skip_undecodable: bool) -> tuple:
    """(uint8 CHW crop, None) or, when skipping, (None, reason); else an error naming the file."""
    try:
        return crop_square(decode_rgb(ref.read()), size, resize), None
    except UndecodableImage as e:
        if not skip_undecodable:
            raise FlowBackFileError(f"{ref.where}: image does not decode ({e}); fix or remove it, or set "
                                    f"data.skip_undecodable: true to skip and count such images") from None
        return None, str(e)


def build_png_shard(job: ShardJob, path: Path) -> list[dict]:
    """Decode, crop and PNG-encode one shard's sources; returns the skipped ones. Runs in a worker process."""
    p = job.payload
    samples, skipped = [], []
    for i, ref in enumerate(p["refs"]):
        image, reason = load_image(ref, p["image_size"], p["resize"], p["skip_undecodable"])
        if image is None:
            skipped.append({"index": job.first + i, "name": ref.name, "error": reason})
            continue
        samples.append({"__key__": sample_key(p["split"], job.first + i), "png": encode_png(image),
                        "cls": str(ref.label).encode("ascii")})
    write_samples(path, samples)
    return skipped


def written_labels(refs: list[ImageRef], entries: list[dict]) -> list[int]:
    """Labels of the sources that made it into the shards (all but the skipped ones)."""
    skipped = {x["index"] for e in entries for x in e.get("skipped", [])}
    return [r.label for i, r in enumerate(refs) if i not in skipped]


def write_imagenet_split(directory: Path, split: str, refs: list[ImageRef], *, image_size: int, resize: str,
                         shard_size: int, num_classes: int, workers: int, skip_undecodable: bool,
                         show_progress: bool = True) -> dict:
    """Write one split as PNG shards (in `workers` processes); returns its manifest entry."""
    settings = {"image_size": image_size, "resize": resize, "skip_undecodable": skip_undecodable}
    jobs = make_jobs(split, refs, shard_size, settings)
    entries = write_jobs(directory, split, jobs, build_png_shard, workers=workers, show_progress=show_progress)
    return split_entry(entries, written_labels(refs, entries), num_classes)
