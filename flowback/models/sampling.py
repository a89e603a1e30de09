"""Generation: the flow's inverse, token by token with a KV cache or by (GS-)Jacobi iteration; guidance; denoising.

Each block is inverted autoregressively (u_{i+1} = v_{i+1} * sigma + mu with (log sigma, mu) from u_0..u_i). With a
KV cache a step feeds only the newest token through the block's layers; without one (`use_cache=False`, kept as
the reference the cache is tested against) each step recomputes the whole prefix. `Solver` picks the sequential
solver or the parallel ones of `jacobi`. Guided steps run the conditional and unconditional passes as one batch
of 2B. `sample` can redraw samples that come out non-finite (fresh noise from the same generator, so a run stays
deterministic) and scale the denoising step.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..errors import FlowBackError
from .guidance import Guidance
from .jacobi import Solver, jacobi_block
from .tarflow import FlowBlock, TARFlow, log_prob_from


class NonFiniteSampleError(FlowBackError):
    """Samples still NaN/inf after the allowed number of redraws."""


@dataclass
class SampleStats:
    """What a sampling call did, summed over calls: parallel passes, sequential fallbacks and fallback steps per
    block (forward numbering; Jacobi solvers only) and the number of samples redrawn for being non-finite."""

    passes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    fallbacks: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    sequential_steps: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    redraws: int = 0

    def record_block(self, block: int, passes: int, fallbacks: int, sequential_steps: int) -> None:
        self.passes[block] += passes
        self.fallbacks[block] += fallbacks
        self.sequential_steps[block] += sequential_steps

    def to_dict(self) -> dict:
        return {"passes": dict(sorted(self.passes.items())), "fallbacks": dict(sorted(self.fallbacks.items())),
                "sequential_steps": dict(sorted(self.sequential_steps.items())), "redraws": self.redraws}

    def merge(self, other: "SampleStats") -> None:
        for block in other.passes.keys() | other.fallbacks.keys() | other.sequential_steps.keys():
            self.record_block(block, other.passes.get(block, 0), other.fallbacks.get(block, 0),
                              other.sequential_steps.get(block, 0))
        self.redraws += other.redraws


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def reverse_block(
    blk: FlowBlock,
    v: torch.Tensor,
    cond: torch.Tensor | None,
    uncond: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Invert one block token by token: v (B, T, D) in spatial order -> u in spatial order. Guided when `uncond` is
    given too; an unguided block still takes the guidance's attention temperature when it applies to every pass."""
    guided = guidance is not None and uncond is not None and cond is not None
    v = blk.permute(v).float()
    B, T, _ = v.shape
    u = v.clone()  # without a start token, token 0 has (log sigma, mu) = (0, 0): it passes unchanged
    c = torch.cat([cond, uncond]) if guided else cond
    temp = guidance.temperature(B, guided, v.device) if guidance is not None else None
    caches = blk.new_caches(T) if use_cache else None
    first = 0 if blk.sos is None else -1  # with a start token, token 0 is transformed too
    for i in range(first, T - 1):
        if i < 0:
            a, b = blk.first(torch.cat([u, u]) if guided else u, c, caches, temp)
        elif use_cache:
            tok = u[:, i : i + 1]
            a, b = blk.step(torch.cat([tok, tok]) if guided else tok, i, c, caches, temp)
        else:
            prefix = u[:, : i + 1]
            a, b = blk.step_uncached(torch.cat([prefix, prefix]) if guided else prefix, c, temp)
        if guided:
            (a_c, a_u), (b_c, b_u) = a.chunk(2), b.chunk(2)
            a, b = guidance.combine(a_c, b_c, a_u, b_u, guidance.weight_at(i, T))
        u[:, i + 1 : i + 2] = blk.affine_inverse(v[:, i + 1 : i + 2], a, b)
    return blk.permute(u)


@torch.no_grad()
def reverse(
    model: TARFlow,
    z: torch.Tensor,
    y: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    use_cache: bool = True,
    dtype: torch.dtype | None = None,
    solver: Solver | None = None,
    stats: SampleStats | None = None,
) -> torch.Tensor:
    """z tokens (B, T, D) -> images (B, C, H, W) through blocks N..1. Blocks the guidance applies to run guided;
    every block gets the guidance object for its attention temperature (attn_temp_on "all")."""
    active = guidance is not None and guidance.active
    B = z.shape[0]
    conds = model.conditions(y, None, B)
    unconds = model.conditions(None, None, B) if active else [None] * len(conds)
    n = len(model.blocks)
    h = z
    with _autocast(z.device, dtype):
        for t in range(n, 0, -1):
            uncond = unconds[t - 1] if active and guidance.applies_to(t, n) else None
            blk, cond = model.blocks[t - 1], conds[t - 1]
            if solver is None or solver.method == "sequential":
                h = reverse_block(blk, h, cond, uncond, guidance, use_cache)
            else:
                h = jacobi_block(blk, h, cond, uncond, guidance, **solver.block(t, n), stats=stats, block=t)
    return model.unpatchify(h)


def denoise(model: TARFlow, x: torch.Tensor, y: torch.Tensor | None, sigma: float, scale: float = 1.0) -> torch.Tensor:
    """One Tweedie step x + scale * sigma^2 * grad_x log p(x | y): removes the training noise from samples
    (scale 1 is Tweedie's formula; ml-tarflow's FID runs tune it)."""
    if sigma <= 0:
        return x
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        logp = log_prob_from(model(x, y)).sum()
        (grad,) = torch.autograd.grad(logp, x)
    return (x + (scale * sigma**2) * grad).detach()


def sample(
    model: TARFlow,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
    guidance: Guidance | None = None,
    denoise_sigma: float = 0.0,
    use_cache: bool = True,
    dtype: torch.dtype | None = None,
    z: torch.Tensor | None = None,
    *,
    solver: Solver | None = None,
    stats: SampleStats | None = None,
    denoise_scale: float = 1.0,
    max_redraws: int = 0,
) -> torch.Tensor:
    """Class-conditional samples in model space (pixels in [-1, 1] or latents), shape (B, C, H, W).

    max_redraws > 0: a sample with a NaN/inf value is drawn again from fresh noise of `generator` (only the bad
    rows, in order, so the result is deterministic), up to max_redraws rounds; then NonFiniteSampleError."""
    cfg = model.cfg
    device = next(model.parameters()).device

    def noise(n: int) -> torch.Tensor:
        return torch.randn(n, cfg.num_tokens, cfg.token_dim, generator=generator, device=device)

    def draw(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = reverse(model, z, y, guidance, use_cache, dtype, solver, stats)
        if denoise_sigma > 0:
            x = denoise(model, x, y, denoise_sigma, denoise_scale)
        return x

    x = draw(noise(len(y)) if z is None else z, y)
    if max_redraws <= 0:
        return x
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    for _ in range(max_redraws):
        if not bad.any():
            break
        idx = bad.nonzero().squeeze(1)
        x[idx] = draw(noise(len(idx)), y[idx])
        bad[idx] = ~torch.isfinite(x[idx]).flatten(1).all(dim=1)
        if stats is not None:
            stats.redraws += len(idx)
    if bad.any():
        raise NonFiniteSampleError(f"{int(bad.sum())} of {len(y)} samples are still NaN/inf after {max_redraws} "
                                   f"redraws (sample.max_redraws)")
    return x


def flow_draw(model: TARFlow, guidance: Guidance | None = None, denoise_sigma: float = 0.0, use_cache: bool = True,
              dtype: torch.dtype | None = None, *, solver: Solver | None = None, denoise_scale: float = 1.0,
              max_redraws: int = 0):
    """The flow's `draw(y, z, g, stats)` for flowback.sampler.generate: `sample` with these settings, noise z of
    shape (num_tokens, token_dim) per image."""

    def draw(y: torch.Tensor, z: torch.Tensor, g: torch.Generator, stats: SampleStats | None) -> torch.Tensor:
        return sample(model, y, g, guidance, denoise_sigma, use_cache, dtype, z=z, solver=solver, stats=stats,
                      denoise_scale=denoise_scale, max_redraws=max_redraws)

    return draw
