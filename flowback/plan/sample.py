"""The sampling plan: the micro-batch of the reverse pass and the denoising gradient for the budget, and the FLOPs of
sampling as the sample stage runs it."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..params import Experiment
from .budget import CUBLAS_WORKSPACE, attention_scratch, outside_allocator, usable
from .measure import GIB, Choice, Measure, PlanError, _fake, _halvings, _largest, _memo, counting, inference_model

_NOT_READ = ("train", "align", "encoder", "metrics", "af")  # params sections sampling never reads


def denoise_sigma(exp: Experiment) -> float:
    """The denoising step's sigma as the sample stage sets it (0: none; a fine-tuned decoder replaces it)."""
    p = exp.params
    return p.model.noise_std if p.sample.denoise and not p.decoder.enabled else 0.0


@_memo(*_NOT_READ, strategy=False)
def denoise_pass(exp: Experiment, micro: int) -> Measure:
    """The peak of sampling `micro` images on one GPU: one KV-cached decoding step of the largest block (its caches
    allocated for every token, doubled with guidance), then the denoising gradient (fp32, as sampling runs it).
    FLOPs: the denoising gradient's (decoding is `sampling_flops`)."""
    from ..models.guidance import Guidance
    from ..models.sampling import denoise

    sp = exp.params.sample
    with _fake():
        model = inference_model(exp)
        cfg = model.cfg
        x = torch.randn(micro, cfg.channels, cfg.image_size, cfg.image_size)
        y = torch.randint(0, cfg.num_classes, (micro,))
        guided = Guidance.of(sp.guidance).active
        blk = max(model.blocks, key=lambda b: len(b.layers))
        rows = 2 * micro if guided else micro
        autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=sp.dtype == "bfloat16")
        with counting(model, x, y) as live:
            caches = blk.new_caches(cfg.num_tokens)
            with torch.no_grad(), torch.autocast(**autocast):
                tok = torch.randn(rows, 1, cfg.token_dim)
                cond = torch.randn(rows, cfg.width)
                for i in range(2):
                    blk.step(tok, i, cond, caches)
            del caches, tok, cond
            decoding = live.flops
            if denoise_sigma(exp) > 0:
                denoise(model, x, y, denoise_sigma(exp))
    scratch = attention_scratch(micro, cfg.num_tokens, cfg.width) if denoise_sigma(exp) > 0 else 0
    workspace = CUBLAS_WORKSPACE + scratch
    return Measure(live.peak, live.flops - decoding, workspace, outside_allocator(1))


@_memo(*_NOT_READ, strategy=False)
def block_flops(exp: Experiment) -> tuple[tuple[int, bool], ...]:
    """(FLOPs of the block's forward pass on one image, whether it is class-conditioned) for blocks 1..N. KV-cached
    decoding computes, token by token, what that causal pass computes (each token attends to the ones before it:
    the executed half of full attention, as measure.py counts causal attention)."""
    with _fake():
        model = inference_model(exp)
        cfg = model.cfg
        x = torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size)
        y = torch.zeros(1, dtype=torch.long)
        conds = model.conditions(y, None, 1)
        per_block: list[int] = []
        with counting(model, x, y) as live:
            for blk in model.blocks:
                blk.register_forward_pre_hook(lambda *_: per_block.append(-live.flops))
                blk.register_forward_hook(lambda *_: per_block.__setitem__(-1, per_block[-1] + live.flops))
            with torch.no_grad():
                model(x, y)
    return tuple((f, c is not None) for f, c in zip(per_block, conds))


def sampling_flops(exp: Experiment, images: int, weight: float | None = None) -> int:
    """FLOPs of sampling `images` images as the sample stage does (flowback.models.sampling.sample): each block
    decoded with its KV cache (guided blocks on twice the rows), then the denoising gradient. `weight` replaces
    sample.guidance.weight (a sweep's scale)."""
    from ..models.guidance import Guidance

    sp = exp.params.sample
    g = Guidance.of(sp.guidance if weight is None else sp.guidance.model_copy(update={"weight": weight}))
    blocks = block_flops(exp)
    n = len(blocks)
    decode = sum(f * (2 if cond and g.applies_to(t, n) else 1) for t, (f, cond) in enumerate(blocks, start=1))
    den = denoise_pass(exp, images).flops
    return images * decode + den


def plan_sample(exp: Experiment, world: int = 1) -> Choice:
    """The sampling micro-batch on each of `world` GPUs (the sample stage's ranks take chunks in turn)."""
    sp = exp.params.sample
    budget = usable(exp.params.runtime.gpu_memory_gib)
    chunk = sp.batch_size
    cands = _halvings(chunk) if sp.micro_batch in ("auto", None) else [sp.micro_batch]
    if sp.micro_batch is None:
        cands = [chunk]
    n = exp.params.samples_per_run
    if budget is None:
        if sp.micro_batch == "auto":
            raise PlanError(f"run {exp.run!r}: sample.micro_batch auto needs runtime.gpu_memory_gib")
        return Choice(exp.run, "sample", min(cands), False, 1, Measure(0, 0), math.ceil(n / min(cands)))

    def need(m: int) -> Measure:
        return dataclasses.replace(denoise_pass(exp, m), outside=outside_allocator(world))

    best = _largest(cands, lambda m: need(m).total <= budget)
    if best is None:
        raise PlanError(f"run {exp.run!r}: sampling with denoising does not fit in runtime.gpu_memory_gib "
                        f"{exp.params.runtime.gpu_memory_gib} GiB even at micro-batch {min(cands)} "
                        f"({need(min(cands)).total / GIB:.1f} GiB); set sample.micro_batch: auto")
    m = dataclasses.replace(need(best), flops=sampling_flops(exp, best))
    return Choice(exp.run, "sample", best, False, 1, m, math.ceil(n / best))


def resolve_sample_micro_batch(exp: Experiment, device: torch.device) -> int | None:
    sp = exp.params.sample
    if sp.micro_batch is None and exp.params.runtime.gpu_memory_gib is None:
        return None
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return plan_sample(exp, world).value
