"""Generation: the flow's inverse, token by token, with a KV cache; guidance; score-based denoising.

Each block is inverted autoregressively (u_{i+1} = v_{i+1} * exp(a) + b with (a, b) from u_0..u_i). With a KV cache
a step feeds only the newest token through the block's layers; without one (`use_cache=False`, kept as the
reference the cache is tested against) each step recomputes the whole prefix. Guided steps run the conditional and
unconditional passes as one batch of 2B.
"""

from __future__ import annotations

import contextlib

import torch

from .guidance import Guidance
from .tarflow import FlowBlock, TARFlow, log_prob_from


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
    """Invert one block: v (B, T, D) in spatial order -> u in spatial order. `uncond` only with guidance."""
    guided = guidance is not None and uncond is not None and cond is not None
    v = blk.permute(v).float()
    B, T, _ = v.shape
    u = v.clone()  # token 0 has a = b = 0: it passes unchanged
    c = torch.cat([cond, uncond]) if guided else cond
    caches = blk.new_caches(T) if use_cache else None
    for i in range(T - 1):
        if use_cache:
            tok = u[:, i : i + 1]
            a, b = blk.step(torch.cat([tok, tok]) if guided else tok, i, c, caches)
        else:
            prefix = u[:, : i + 1]
            a, b = blk.step_uncached(torch.cat([prefix, prefix]) if guided else prefix, c)
        if guided:
            (a_c, a_u), (b_c, b_u) = a.chunk(2), b.chunk(2)
            a, b = guidance.combine(a_c, b_c, a_u, b_u, guidance.weight_at(i, T))
        u[:, i + 1 : i + 2] = v[:, i + 1 : i + 2] * torch.exp(a.float()) + b.float()
    return blk.permute(u)


@torch.no_grad()
def reverse(
    model: TARFlow,
    z: torch.Tensor,
    y: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    use_cache: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """z tokens (B, T, D) -> images (B, C, H, W) through blocks N..1."""
    guidance = guidance if guidance is not None and guidance.active else None
    B = z.shape[0]
    conds = model.conditions(y, None, B)
    unconds = model.conditions(None, None, B) if guidance else [None] * len(conds)
    n = len(model.blocks)
    h = z
    with _autocast(z.device, dtype):
        for t in range(n, 0, -1):
            g = guidance if guidance is not None and guidance.applies_to(t, n) else None
            h = reverse_block(model.blocks[t - 1], h, conds[t - 1], unconds[t - 1] if g else None, g, use_cache)
    return model.unpatchify(h)


def denoise(model: TARFlow, x: torch.Tensor, y: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """One Tweedie step x + sigma^2 * grad_x log p(x | y): removes the training noise from samples."""
    if sigma <= 0:
        return x
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        logp = log_prob_from(model(x, y)).sum()
        (grad,) = torch.autograd.grad(logp, x)
    return (x + sigma**2 * grad).detach()


def sample(
    model: TARFlow,
    y: torch.Tensor,
    generator: torch.Generator | None = None,
    guidance: Guidance | None = None,
    denoise_sigma: float = 0.0,
    use_cache: bool = True,
    dtype: torch.dtype | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-conditional samples in model space (pixels in [-1, 1] or latents), shape (B, C, H, W)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    if z is None:
        z = torch.randn(len(y), cfg.num_tokens, cfg.token_dim, generator=generator, device=device)
    x = reverse(model, z, y, guidance, use_cache, dtype)
    if denoise_sigma > 0:
        x = denoise(model, x, y, denoise_sigma)
    return x
