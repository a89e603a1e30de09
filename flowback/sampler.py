"""Sample generation in resumable chunks, written in the ADM .npz format, for any model family.

A family gives a `draw(y, z, g, stats) -> x` function (the flow's inverse pass with guidance and denoising,
models/sampling.py `flow_draw`; an adversarial flow's generator) and the shape of its noise. Chunk c draws its noise
from its own generator, derive_seed("chunk", seed, c), on the CPU (then moved to the device, so a GPU gives the same
noise as a CPU, as the R-REPA paper's sampler does), and is saved atomically as chunks/c.npz; a re-run skips the chunks
already on disk, so a killed run loses at most one chunk and never duplicates or drops an image. The chunk directory
records a key (checkpoint hash + sampling settings); chunks made under another key are discarded. Under torchrun,
rank r makes chunks r, r + world, ... on its own GPU; rank 0 assembles them once all are done. A draw that counts
redraws of non-finite samples in `stats` has the count kept in each chunk file, so the total over a resumed or sharded
run is exact.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data.images import nchw_to_nhwc, to_uint8
from .errors import FlowBackError
from .io import FlowBackFileError, load_npz, save_npz, write_bytes
from .progress import progress as tqdm
from .seeding import generator


def sample_labels(num_classes: int, per_class: int, how: str = "balanced", seed: int = 0,
                  count: int | None = None) -> np.ndarray:
    """The class of every sample: `balanced` cycles through the classes (exactly per_class each; with `count`, the
    first `count` of the cycle, as even as it can be); `random` draws num_classes * per_class (or `count`) classes
    uniformly from a generator seeded by `seed` (ADM / ml-tarflow)."""
    n = num_classes * per_class if count is None else count
    if how == "balanced":
        return np.resize(np.arange(num_classes, dtype=np.int64), n)
    if how == "random":
        return np.random.default_rng(seed).integers(0, num_classes, n, dtype=np.int64)
    raise ValueError(f"sample.labels must be 'balanced' or 'random', got {how!r}")


def generate(
    draw: Callable[..., torch.Tensor],
    shape: tuple[int, ...],
    labels: np.ndarray,
    chunk_dir: str | Path,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    key: str = "",
    micro_batch: int | None = None,
    stats: Any = None,
) -> tuple[np.ndarray, float]:
    """Generate images for `labels` (uint8 NHWC) through chunk files; returns (images, seconds spent generating).

    `draw(y, z, g, chunk_stats)` turns labels and noise of `shape` per sample into images in [-1, 1] (or latents, then
    `decode`d); `g` is the chunk's generator on the device, for any redraw. In a torch.distributed run every rank makes
    its share of the chunks; rank 0 returns all images, the others an empty array. `micro_batch` images are drawn at a
    time (the memory plan's choice); the chunk's noise is drawn whole first, so the images do not depend on it.
    `stats` (rank 0), when given, gets each chunk's own stats object (`type(stats)()`, merged with `merge`) for the
    chunks made here and the redraws of all chunks. An error in a chunk names it."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(device)
    chunk_dir = Path(chunk_dir)
    key_file = chunk_dir / "KEY"
    if rank == 0:
        if chunk_dir.exists() and (not key_file.exists() or key_file.read_text() != key):
            shutil.rmtree(chunk_dir)
        write_bytes(key_file, key.encode())
    if world > 1:
        dist.barrier()  # nobody writes a chunk before stale ones are gone
    n_chunks = math.ceil(len(labels) / batch_size)
    seconds = 0.0
    for c in tqdm(range(rank, n_chunks, world), desc="sample", unit="chunk", disable=not show_progress or rank != 0):
        path = chunk_dir / f"{c:06d}.npz"
        want = labels[c * batch_size : (c + 1) * batch_size]
        if path.exists():
            try:
                if np.array_equal(load_npz(path)["arr_1"], want):
                    continue
            except (FlowBackFileError, KeyError):
                pass  # a damaged or foreign chunk is regenerated
        t0 = time.perf_counter()
        g = generator("chunk", seed, c)
        z = torch.randn(len(want), *shape, generator=g).to(device)
        g = g if device.type == "cpu" else generator("chunk", seed, c, device=device)
        y = torch.from_numpy(want).to(device)
        m = micro_batch or len(y)
        chunk_stats = type(stats)() if stats is not None else None
        parts = []
        for i in range(0, len(y), m):
            try:
                x = draw(y[i : i + m], z[i : i + m], g, chunk_stats)
            except FlowBackError as e:
                raise type(e)(f"{path}: chunk {c} (seed {seed}): {e}") from e
            if decode is not None:
                x = decode(x)
            parts.append(nchw_to_nhwc(to_uint8(x)).cpu().numpy())
        extra = {}
        if chunk_stats is not None:
            stats.merge(chunk_stats)
            extra = {"redraws": np.array(chunk_stats.redraws)} if chunk_stats.redraws else {}
        save_npz(path, arr_0=np.concatenate(parts), arr_1=want, **extra)
        seconds += time.perf_counter() - t0
    if world > 1:
        dist.barrier()
        if rank != 0:
            return np.zeros((0,), np.uint8), seconds
    chunks = [load_npz(chunk_dir / f"{c:06d}.npz") for c in range(n_chunks)]
    if stats is not None:
        stats.redraws = sum(int(ch["redraws"]) for ch in chunks if "redraws" in ch)
    return np.concatenate([ch["arr_0"] for ch in chunks]), seconds
