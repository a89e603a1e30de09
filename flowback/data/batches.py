"""Where a training step's images come from: in memory (the embedded default) or streamed from shards (ImageNet).

Both are the same interface, `batches.get(step) -> Batch`, bound to one rank of `world` at construction, and both give
step `s` a deterministic batch, so a run resumed from a checkpoint takes the steps an uninterrupted run would:

- `MemoryBatches`: the global batch of step s is a slice of seeded per-epoch permutations; rank r takes its
  contiguous part of it, so 1 or N processes train on the same global batches.
- `ShardBatches`: streamed through flowback.data.loader (resampled shards, shuffle buffer, per-rank and per-worker
  streams). The stream is re-seeded at every `segment` steps (= train.checkpoint_every), so resuming at a checkpoint
  needs no replay of the data already seen: the state on disk always sits at a segment boundary. Random horizontal
  flips (TARFlow's RandomHorizontalFlip) are drawn per sample from (seed, step, rank). Latent shards give the stored
  posterior mean of the image or of its flip (both were encoded by `flowback.data.latents`), and the matching pixels
  (PNG crop, flipped alike) for the alignment encoder. With `pin_memory` the batch it builds (flipped, converted)
  is pinned, so the copy to the GPU overlaps the step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..seeding import generator
from .images import to_model


@dataclass
class Batch:
    x: torch.Tensor  # model-space input before noise: [-1, 1] pixels, or scaled latents
    y: torch.Tensor  # int64 labels
    index: torch.Tensor | None = None  # rows of the in-memory set (its alignment targets are cached by row)
    pixels: torch.Tensor | None = None  # uint8 images for the alignment encoder (streamed data)

    def to(self, device: torch.device) -> "Batch":
        """Copy to `device`; from pinned host memory (`pinned()`) the copies are asynchronous, from pageable memory
        `non_blocking` has no effect and each copy waits."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, x=move(self.x), y=move(self.y), index=move(self.index), pixels=move(self.pixels))

    def pinned(self) -> "Batch":
        """The same tensors in page-locked host memory (needs CUDA)."""
        def pin(t):
            return None if t is None else t.pin_memory()

        return replace(self, x=pin(self.x), y=pin(self.y), index=pin(self.index), pixels=pin(self.pixels))


class Batches(Protocol):
    """A rank's view of the training data: `get(step)` is the rank's share of step `step`'s global batch."""

    def get(self, step: int) -> Batch: ...


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices for `step`: consecutive slices of per-epoch permutations (an epoch is ceil(n / batch) steps)."""
    pos, out = step * batch, []
    while sum(len(o) for o in out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=generator("epoch", seed, epoch))
        take = min(batch - sum(len(o) for o in out), n - offset)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


class MemoryBatches:
    """uint8 images held in memory; no augmentation (the digits must not be flipped)."""

    def __init__(self, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, *, rank: int = 0,
                 world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes")
        self.images, self.labels, self.batch_size, self.seed = images_u8, labels, batch_size, seed
        self.rank, self.world = rank, world

    def get(self, step: int) -> Batch:
        idx = batch_indices(step, len(self.images), self.batch_size, self.seed)
        part = idx.view(self.world, -1)[self.rank]
        return Batch(to_model(self.images[part]), self.labels[part].clone(), index=part)


class ShardBatches:
    """Per-rank batches streamed from WebDataset shards, re-seeded every `segment` steps (exact resume)."""

    def __init__(self, directory: str | Path, split: str, batch_size: int, seed: int, segment: int, *,
                 rank: int = 0, world: int = 1, workers: int = 0, shuffle_buffer: int = 1000, flip: bool = True,
                 pin_memory: bool = False):
        from .manifest import load_manifest

        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes")
        self.directory, self.split, self.seed, self.segment = Path(directory), split, seed, segment
        self.rank, self.world, self.workers, self.shuffle_buffer, self.flip = rank, world, workers, shuffle_buffer, flip
        self.pin_memory = pin_memory
        self.per_rank = batch_size // world
        manifest = load_manifest(self.directory)
        self.latent = "mean.npy" in manifest.members
        self._segment: int | None = None
        self._it: Iterator[dict] | None = None
        self._next_step = -1

    def _open(self, segment: int) -> None:
        from ..seeding import derive_seed
        from .loader import make_loader

        loader = make_loader(self.directory, self.split, self.per_rank, rank=self.rank, world=self.world,
                             workers=self.workers, resampled=True, seed=derive_seed("shards", self.seed, segment),
                             shuffle_buffer=self.shuffle_buffer, batches=self.segment)  # get() pins what it builds
        self._segment, self._it, self._next_step = segment, iter(loader), segment * self.segment

    def get(self, step: int) -> Batch:
        segment = step // self.segment
        if segment != self._segment or step < self._next_step:
            self._open(segment)
        while self._next_step < step:  # only after an unusual resume point: replay within the segment
            next(self._it)
            self._next_step += 1
        raw = next(self._it)
        self._next_step += 1
        b = len(raw["label"])
        g = generator("flip", self.seed, step, self.rank)
        flip = (torch.rand(b, generator=g) < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool)
        pixels = raw.get("image")
        if pixels is not None:
            pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        if self.latent:
            x = raw["mean"][torch.arange(b), flip.long()].float()  # the stored encoding of the image or its flip
        else:
            x = to_model(pixels)
        batch = Batch(x, raw["label"], pixels=pixels)
        return batch.pinned() if self.pin_memory else batch  # the tensors built here, not the loader's, are copied


def run_batches(params, batch_size: int, segment: int, rank: int, world: int, device):
    """(this rank's Batches of the train split, the in-memory training images or None) for a training run: the digits
    from memory, ImageNet streamed from its shards (checked against the params first, as load_split does)."""
    from .manifest import check_prepared, load_split

    if params.data.dataset == "digits":
        images, labels = (torch.from_numpy(a) for a in load_split(params, "train"))
        return MemoryBatches(images, labels, batch_size, params.train.seed, rank=rank, world=world), images
    tp = params.train
    check_prepared(params)
    return ShardBatches(params.data.dir, "train", batch_size, tp.seed, segment, rank=rank, world=world,
                        workers=tp.workers, shuffle_buffer=tp.shuffle_buffer, flip=tp.flip,
                        pin_memory=device.type == "cuda"), None
