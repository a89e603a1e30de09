"""`flowback plan`: every run's plans in one table, with FLOPs and GPU-hours, ending `max peak: N GiB of M GiB`."""

from __future__ import annotations

import torch

from ..params import Params
from .budget import CUBLAS_WORKSPACE, CUDA_CONTEXT, MARGIN, NCCL_BUFFERS, outside_allocator
from .measure import GIB, H100_BF16_TFLOPS, Choice, Measure, PlanError, _fake, measure
from .prefetch import prefetch


def encode_pass(params: Params, batch: int) -> Measure:
    """One VAE encode batch of the latent profiles (image and flip: 2 x batch views), in one process."""
    from ..models.vae import LatentCodec, vae_from_config

    lp, d = params.model.latent, params.data
    with _fake():
        codec = LatentCodec(vae_from_config(lp.vae_dir), lp.scale, batch)
        x = torch.randn(2 * batch, 3, d.image_size, d.image_size)
        m = measure(lambda: codec.encode_with_std(x), codec, x)
    return Measure(m.peak, m.flops, CUBLAS_WORKSPACE, outside_allocator(1))


def world_size(launcher: str) -> int:
    """GPUs per run from the launcher (`torchrun --nnodes M --nproc_per_node N ...` -> M x N; python -> 1)."""
    import re

    n = re.search(r"--nproc[_-]per[_-]node[ =](\d+)", launcher)
    m = re.search(r"--nnodes[ =](\d+)(?::(\d+))?", launcher)
    return (int(n.group(1)) if n else 1) * (int(m.group(2) or m.group(1)) if m else 1)


def _val_images(params: Params) -> int:
    d = params.data
    if d.dataset == "digits":
        return round(1797 * d.val_fraction)
    return 50 * d.num_classes  # ImageNet's validation set: 50 images per class


def plan_rows(params: Params, world: int) -> list[tuple[Choice, float]]:
    """(choice, TFLOP-hours at MFU 1) for every run's stages (its family's plan), and the encode step if latent."""
    from ..families import family

    rows = []
    for run in params.runs():
        exp = params.run(run)
        rows += family(exp.family).plan(exp, world, _val_images(params))
    if params.data.format == "latent" and params.model.latent is not None:
        m = encode_pass(params, params.data.encode_batch_size)
        rows.append((Choice("-", "encode", params.data.encode_batch_size, False, 1, m, 0), 0.0))
    return rows


def print_plan(path: str, gpu_mem: float | None = None, world: int | None = None, mfu: float = 0.4,
               peak_tflops: float = H100_BF16_TFLOPS, out=print) -> int:
    """`flowback plan`: the table, then `max peak: N GiB of M GiB`; exit 2 (via PlanError) if a run cannot fit."""
    from ..params import load_params

    params = load_params(path)
    if gpu_mem is not None:
        params = params.model_copy(update={"runtime": params.runtime.model_copy(update={"gpu_memory_gib": gpu_mem})})
    if params.runtime.gpu_memory_gib is None:
        raise PlanError(f"{path}: no memory budget: pass --gpu-mem GiB or set runtime.gpu_memory_gib")
    world = world or world_size(params.runtime.launcher)
    budget = params.runtime.gpu_memory_gib
    out(f"{path}: memory plan for {world} GPU(s) per run with {budget:g} GiB each (peaks kept under "
        f"{MARGIN:.0%}: {budget * MARGIN:.1f} GiB), measured on the real code under fake tensors; GPU-hours at "
        f"MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s")
    out(f"peaks: every tensor measured, plus cuBLAS and attention workspaces, the CUDA context "
        f"({CUDA_CONTEXT / GIB:g} GiB) and, on 2+ GPUs, NCCL's buffers ({NCCL_BUFFERS / GIB:g} GiB); docs/scale.md")
    out("")
    out("| run | stage | peak / GPU (GiB) | TFLOP per step | choice | GPU-hours |")
    out("|---|---|---|---|---|---|")
    prefetch(params, world, _val_images(params))  # the distinct configurations, measured on every core at once
    rows = plan_rows(params, world)
    total = 0.0
    for c, tflop_hours in rows:
        hours = tflop_hours / (mfu * peak_tflops)
        total += hours
        if c.stage == "train":
            what = (f"micro-batch {c.value} x {c.accumulation} accumulation"
                    f"{', checkpointing' if c.checkpointing else ''}")
            per_step = c.measure.flops * world / 1e12
        elif c.stage == "encode":
            what, per_step = f"VAE batch {c.value} (x2: image and flip)", c.measure.flops / 1e12
        else:
            what, per_step = f"batch {c.value}" + (f", {c.note}" if c.note else ""), c.measure.flops / 1e12
        sampling = c.stage in ("sample", "sweep", "curve")
        note = " (a lower bound: KV-cached decoding runs far below training MFU)" if sampling else ""
        shown = f"{hours:,.1f}" if hours >= 0.1 or hours == 0 else f"{hours:.2g}"  # sampling: minutes, not zero
        out(f"| {c.run} | {c.stage} | {c.measure.total / GIB:.1f} | {per_step:.1f} | {what} | {shown}{note} |")
    out("")
    out(f"grid total: {total:,.0f} GPU-hours at MFU {mfu:.0%}")
    peak = max(c.measure.total for c, _ in rows) / GIB
    out(f"max peak: {peak:.1f} GiB of {budget:g} GiB")
    return 0
