"""Streaming WebDataset loading for DDP training and sharded evaluation, without webdataset's pickle decoders.

Training (`resampled=True`): every (rank, worker) draws shards with replacement from its own deterministic RNG
(seeded by seed, rank, worker, epoch), shuffles samples in a buffer, and stops after a fixed number of batches, so
every rank runs the same number of steps per "epoch" whatever the shard sizes - DDP never waits on a rank that ran
dry. The epoch length is the split's sample count / (world x batch size) batches per rank, rounded down.

Evaluation (`resampled=False`): the shard list is cut into disjoint parts by rank, then by worker; every sample
is read exactly once across all ranks and workers (tested), in shard order within a part.

Samples are decoded by flowback.data.format.decode_sample (png/cls/npy only, allow_pickle=False), with the same
label-range and image-size checks as everywhere else; a bad sample stops the run with the shard and key named.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from ..io import FlowBackFileError
from .format import BadMember, decode_sample, member_filter
from .manifest import load_manifest


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardSource(torch.utils.data.IterableDataset):
    """Yields {"url": shard} dicts: resampled per (rank, worker, epoch), or a disjoint slice per (rank, worker)."""

    def __init__(self, urls: list[str], rank: int, world: int, resampled: bool, seed: int):
        super().__init__()
        self.urls, self.rank, self.world, self.resampled, self.seed = list(urls), rank, world, resampled, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, workers = _worker()
        if self.resampled:
            rng = random.Random(f"{self.seed}|{self.rank}|{worker}|{self.epoch}")
            while True:
                yield {"url": rng.choice(self.urls)}
        else:
            mine = self.urls[self.rank::self.world][worker::workers]
            yield from ({"url": u} for u in mine)


def _shuffle(samples: Iterator[dict], buffer: int, seed: str) -> Iterator[dict]:
    rng = random.Random(seed)
    pool: list[dict] = []
    for s in samples:
        if len(pool) < buffer:
            pool.append(s)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = s
    rng.shuffle(pool)
    yield from pool


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples {"image" | "mean.npy"/"std.npy", "label", "key"} from a ShardSource, optionally shuffled."""

    def __init__(self, directory: str | Path, split: str, *, rank: int = 0, world: int = 1, resampled: bool = True,
                 seed: int = 0, shuffle_buffer: int = 1000):
        super().__init__()
        directory = Path(directory)
        manifest = load_manifest(directory)
        self.entry = manifest.split(split, directory)
        self.source = ShardSource([str(directory / s.name) for s in self.entry.shards], rank, world, resampled, seed)
        pixels = manifest.pixels
        self.check = dict(num_classes=manifest.num_classes, members=manifest.members,
                          image_size=manifest.image_size if pixels else None,
                          channels=manifest.channels if pixels else None)
        self.shuffle_buffer = shuffle_buffer if resampled else 0
        self.rank, self.seed = rank, seed

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def _raw(self) -> Iterator[dict[str, Any]]:
        shards = iter(self.source)
        files = wds.tariterators.url_opener(shards, handler=wds.reraise_exception)
        yield from wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander(files, handler=wds.reraise_exception, select_files=member_filter("shard")),
            handler=wds.reraise_exception)

    def _decoded(self) -> Iterator[dict[str, Any]]:
        """Decoded samples; a damaged tar is an error naming the shard (webdataset appends it), never a skip."""
        try:
            for raw in self._raw():
                yield decode_sample(raw, raw.get("__url__", "?"), **self.check)
        except FlowBackFileError:
            raise
        except BadMember as e:
            raise FlowBackFileError(e.message) from None
        except Exception as e:  # tarfile.ReadError, OSError, ValueError (duplicate member)...
            detail = " ".join(str(a) for a in e.args)
            raise FlowBackFileError(f"truncated or corrupted shard ({type(e).__name__}: {detail})") from e

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples = self._decoded()
        if self.shuffle_buffer > 1:
            worker, _ = _worker()
            samples = _shuffle(samples, self.shuffle_buffer, f"{self.seed}|{self.rank}|{worker}|{self.source.epoch}")
        yield from samples


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
                           "key": [s["key"] for s in samples]}
    for k in ("image", "mean.npy", "std.npy"):
        if k in samples[0]:
            out[k.removesuffix(".npy")] = torch.from_numpy(np.stack([s[k] for s in samples]))
    return out


def epoch_batches(count: int, world: int, batch_size: int) -> int:
    """Batches per rank per epoch: the split's samples shared over the ranks, whole batches only."""
    return max(1, count // (world * batch_size))


def make_loader(directory: str | Path, split: str, batch_size: int, *, rank: int = 0, world: int = 1,
                workers: int = 0, resampled: bool = True, seed: int = 0, shuffle_buffer: int = 1000,
                batches: int | None = None, pin_memory: bool = False) -> wds.WebLoader:
    """A DataLoader of {"image" uint8 (B, C, H, W) | "mean"/"std", "label", "key"} batches for this rank.

    Resampled loaders yield exactly `batches` (default: epoch_batches) batches per pass, split over the workers;
    call `loader.set_epoch(e)` to change the shard draw and shuffle per epoch. Non-resampled loaders yield every
    sample of this rank's part once (the last batch may be short).
    """
    stream = ShardStream(directory, split, rank=rank, world=world, resampled=resampled, seed=seed,
                         shuffle_buffer=shuffle_buffer)
    if resampled:
        batches = batches or epoch_batches(stream.entry.count, world, batch_size)
        per_worker = math.ceil(batches / max(1, workers))
        pipeline = wds.DataPipeline(stream, wds.batched(batch_size, collation_fn=collate, partial=False)
                                    ).with_epoch(per_worker)
    else:
        pipeline = wds.DataPipeline(stream, wds.batched(batch_size, collation_fn=collate, partial=True))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False,
                           pin_memory=pin_memory)
    if resampled:
        loader = loader.with_epoch(batches).with_length(batches, silent=True)
    loader.set_epoch = stream.set_epoch  # type: ignore[attr-defined]
    return loader
