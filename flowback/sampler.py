"""Class-balanced sample generation in resumable chunks, written in the ADM .npz format.

Labels are interleaved (0, 1, ..., K-1, 0, 1, ...) so every chunk, and any prefix of the run, is class-balanced.
Chunk c is drawn with its own generator, derive_seed("chunk", seed, c), and saved atomically as chunks/c.npz; a re-run skips
the chunks already on disk, so a killed run loses at most one chunk and never duplicates or drops an image. The
chunk directory records a key (checkpoint hash + sampling settings); chunks made under another key are discarded.
Under torchrun, rank r makes chunks r, r + world, ... on its own GPU; rank 0 assembles them once all are done.
A sample that comes out NaN/inf is redrawn from the chunk's own generator (`max_redraws`); each chunk file keeps its
redraw count, so the total over a resumed or sharded run is exact.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from .progress import progress as tqdm

from .data.images import nchw_to_nhwc, to_uint8
from .io import FlowBackFileError, load_npz, save_npz, write_bytes
from .models.guidance import Guidance
from .models.jacobi import Solver
from .models.sampling import NonFiniteSampleError, SampleStats, sample
from .models.tarflow import TARFlow
from .seeding import generator

if TYPE_CHECKING:
    from .params import GuidanceParams, SampleParams


def guidance(g: "GuidanceParams") -> Guidance:
    """The guidance rule sample.guidance describes."""
    return Guidance(g.method, g.weight, g.anneal, g.guide_what, g.attn_temp, g.blocks, g.attn_temp_on)


def solver(s: "SampleParams") -> Solver:
    """The block inversion sample.solver / sample.jacobi describe."""
    j = s.jacobi
    tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    return Solver(s.solver, j.tol, tup(j.max_iters), tup(j.segments) if s.solver == "gs_jacobi" else 1,
                  tup(j.init), tup(j.window) if s.solver == "gs_jacobi" else 0)


def sample_labels(num_classes: int, per_class: int, how: str = "balanced", seed: int = 0) -> np.ndarray:
    """The class of every sample: `balanced` cycles through the classes (exactly per_class each); `random` draws
    num_classes * per_class classes uniformly from a generator seeded by `seed` (ADM / ml-tarflow)."""
    n = num_classes * per_class
    if how == "balanced":
        return np.tile(np.arange(num_classes, dtype=np.int64), per_class)
    if how == "random":
        return np.random.default_rng(seed).integers(0, num_classes, n, dtype=np.int64)
    raise ValueError(f"sample.labels must be 'balanced' or 'random', got {how!r}")


def generate(
    model: TARFlow,
    labels: np.ndarray,
    chunk_dir: str | Path,
    batch_size: int,
    seed: int,
    guidance: Guidance | None = None,
    denoise_sigma: float = 0.0,
    use_cache: bool = True,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    decode=None,
    key: str = "",
    micro_batch: int | None = None,
    *,
    solver: Solver | None = None,
    max_redraws: int = 0,
    denoise_scale: float = 1.0,
    stats: SampleStats | None = None,
    draw=None,
) -> tuple[np.ndarray, float]:
    """Generate images for `labels` (uint8 NHWC) through chunk files; returns (images, seconds spent generating).

    In a torch.distributed run every rank makes its share of the chunks; rank 0 returns all images, the others an
    empty array. `micro_batch` images go through the reverse pass and the denoising gradient at a time (the memory
    plan's choice); the chunk's noise is drawn whole first, so the images do not depend on it (only the noise of a
    NaN redraw, drawn after it, does). `stats` (rank 0) gets the solver's counts of the chunks made here and the
    redraws of all chunks. A chunk whose samples stay non-finite after max_redraws redraws is a NonFiniteSampleError
    naming it. `draw(y, z)` replaces the flow's sampler for another model family (an adversarial flow's generator):
    z is then drawn in the shape `model.cfg.image_shape`."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    chunk_dir = Path(chunk_dir)
    key_file = chunk_dir / "KEY"
    if rank == 0:
        if chunk_dir.exists() and (not key_file.exists() or key_file.read_text() != key):
            shutil.rmtree(chunk_dir)
        write_bytes(key_file, key.encode())
    if world > 1:
        dist.barrier()  # nobody writes a chunk before stale ones are gone
    device = next(model.parameters()).device
    n_chunks = math.ceil(len(labels) / batch_size)
    seconds = 0.0
    mine = range(rank, n_chunks, world)
    for c in tqdm(mine, desc="sample", unit="chunk", disable=not show_progress or rank != 0):
        path = chunk_dir / f"{c:06d}.npz"
        want = labels[c * batch_size : (c + 1) * batch_size]
        if path.exists():
            try:
                if np.array_equal(load_npz(path)["arr_1"], want):
                    continue
            except (FlowBackFileError, KeyError):
                pass  # a damaged or foreign chunk is regenerated
        t0 = time.perf_counter()
        g = generator("chunk", seed, c, device=device)
        y = torch.from_numpy(want).to(device)
        cfg = model.cfg
        shape = cfg.image_shape if draw is not None else (cfg.num_tokens, cfg.token_dim)
        z = torch.randn(len(y), *shape, generator=g, device=device)
        m = micro_batch or len(y)
        chunk_stats, parts = SampleStats(), []
        for i in range(0, len(y), m):
            if draw is not None:
                x = draw(y[i : i + m], z[i : i + m])
            else:
                try:
                    x = sample(model, y[i : i + m], g, guidance, denoise_sigma, use_cache, dtype, z=z[i : i + m],
                               solver=solver, stats=chunk_stats, denoise_scale=denoise_scale, max_redraws=max_redraws)
                except NonFiniteSampleError as e:
                    raise NonFiniteSampleError(f"{path}: chunk {c} (seed {seed}): {e}") from e
            if decode is not None:
                x = decode(x)
            parts.append(nchw_to_nhwc(to_uint8(x)).cpu().numpy())
        if stats is not None:
            for name in ("passes", "fallbacks", "sequential_steps"):
                for block, n in getattr(chunk_stats, name).items():
                    getattr(stats, name)[block] += n
        extra = {"redraws": np.array(chunk_stats.redraws)} if max_redraws > 0 else {}
        save_npz(path, arr_0=np.concatenate(parts), arr_1=want, **extra)
        seconds += time.perf_counter() - t0
    if world > 1:
        dist.barrier()
        if rank != 0:
            return np.zeros((0,), np.uint8), seconds
    chunks = [load_npz(chunk_dir / f"{c:06d}.npz") for c in range(n_chunks)]
    if stats is not None:
        stats.redraws += sum(int(ch["redraws"]) for ch in chunks if "redraws" in ch)
    images = np.concatenate([ch["arr_0"] for ch in chunks])
    return images, seconds

