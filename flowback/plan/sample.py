"""The sampling plan: the micro-batch of the reverse pass and the denoising gradient for the budget."""

from __future__ import annotations

import math

import torch

from ..params import Experiment
from .measure import GIB, Choice, Measure, PlanError, _budget, _fake, _halvings, _largest, _memo, measure


def inference_model(exp: Experiment):
    """The run's flow for inference (frozen), as sample and evaluate load it; usually built under fake tensors."""
    from ..builders import flow_config
    from ..models.tarflow import TARFlow

    return TARFlow(flow_config(exp.params)).eval().requires_grad_(False)


@_memo
def forward_flops(exp: Experiment, batch: int) -> int:
    """FLOPs of one forward pass (what KV-cached decoding computes per image, token by token)."""
    with _fake():
        model = inference_model(exp)
        cfg = model.cfg
        x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
        return measure(lambda: model(x), model, x).flops


@_memo
def denoise_pass(exp: Experiment, micro: int) -> Measure:
    """The denoising gradient step (fp32, as sampling runs it) on `micro` images, plus one KV-cached decoding step of
    the largest block (its caches allocated for every token, doubled with guidance)."""
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

        def work():
            caches = blk.new_caches(cfg.num_tokens)
            with torch.no_grad(), torch.autocast(**autocast):
                tok = torch.randn(rows, 1, cfg.token_dim)
                cond = torch.randn(rows, cfg.width)
                for i in range(2):
                    blk.step(tok, i, cond, caches)
            del caches
            if sp.denoise:
                denoise(model, x, y, exp.params.model.noise_std)

        return measure(work, model, x, y)


def plan_sample(exp: Experiment) -> Choice:
    sp = exp.params.sample
    budget = _budget(exp.params)
    chunk = sp.batch_size
    cands = _halvings(chunk) if sp.micro_batch in ("auto", None) else [sp.micro_batch]
    if sp.micro_batch is None:
        cands = [chunk]
    n = exp.params.samples_per_run
    if budget is None:
        if sp.micro_batch == "auto":
            raise PlanError(f"run {exp.run!r}: sample.micro_batch auto needs runtime.gpu_memory_gib")
        return Choice(exp.run, "sample", min(cands), False, 1, Measure(0, 0), math.ceil(n / min(cands)))
    best = _largest(cands, lambda m: denoise_pass(exp, m).peak <= budget)
    if best is None:
        raise PlanError(f"run {exp.run!r}: sampling with denoising does not fit in runtime.gpu_memory_gib "
                        f"{exp.params.runtime.gpu_memory_gib} GiB even at micro-batch {min(cands)} "
                        f"({denoise_pass(exp, min(cands)).peak / GIB:.1f} GiB); set sample.micro_batch: auto")
    return Choice(exp.run, "sample", best, False, 1, denoise_pass(exp, best), math.ceil(n / best))


def resolve_sample_micro_batch(exp: Experiment, device: torch.device) -> int | None:
    sp = exp.params.sample
    if sp.micro_batch is None and exp.params.runtime.gpu_memory_gib is None:
        return None
    return plan_sample(exp).value
