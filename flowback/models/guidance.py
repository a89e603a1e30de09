"""Classifier-free guidance rules for autoregressive affine flows.

Both act on one token's affine parameters, where the next token is drawn as x = z * exp(a) + b:
- TARFlow (Zhai et al.): extrapolate both parameters, a <- a_c + w (a_c - a_u), b <- b_c + w (b_c - b_u), in every
  block; optionally annealed, w_i = (i + 1) / (T - 1) * w at step i.
- STARFlow (Gu et al.): treat the block's conditional as the Gaussian N(b, exp(a)^2) and sample p_c^(1+w) / p_u^w,
  which is again Gaussian; s = min(sigma_c / sigma_u, 1)^2 keeps its precision positive. Applied only in the block
  next to the prior (the deep block), where the Gaussian reading is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    method: str = "none"  # none | tarflow | starflow
    weight: float = 0.0
    anneal: bool = False

    def __post_init__(self):
        if self.method not in ("none", "tarflow", "starflow"):
            raise ValueError(f"guidance method must be none, tarflow or starflow, got {self.method!r}")
        if self.weight < 0:
            raise ValueError(f"guidance weight must be >= 0, got {self.weight}")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.weight > 0

    def applies_to(self, block_index: int, num_blocks: int) -> bool:
        """block_index is 1-based in forward order; STARFlow guides only block N (first in generation)."""
        if not self.active:
            return False
        return self.method == "tarflow" or block_index == num_blocks

    def weight_at(self, step: int, num_tokens: int) -> float:
        if not self.anneal:
            return self.weight
        return (step + 1) / (num_tokens - 1) * self.weight

    def combine(self, a_c, b_c, a_u, b_u, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "tarflow":
            return a_c + w * (a_c - a_u), b_c + w * (b_c - b_u)
        # starflow: Gaussian product in the scale/mean parameterisation, computed in fp32
        a_c, b_c, a_u, b_u = (t.float() for t in (a_c, b_c, a_u, b_u))
        s = torch.exp(2 * torch.clamp(a_c - a_u, max=0.0))
        denom = 1 + w - w * s
        return a_c - 0.5 * torch.log(denom), ((1 + w) * b_c - w * s * b_u) / denom
