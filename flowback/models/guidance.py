"""Classifier-free guidance rules for autoregressive affine flows.

Both act on one token's affine parameters (log sigma, mu), where the next token is drawn as x = z * sigma + mu
(for TARFlow's exp scale, log sigma is the raw output a and mu is b):
- TARFlow (Zhai et al.): extrapolate both parameters, a <- a_c + w (a_c - a_u), b <- b_c + w (b_c - b_u), in every
  conditioned block; optionally annealed, w_i = (i + 1) / (T - 1) * w at step i. `guide_what` ("a", "b", "ab")
  picks which parameters are extrapolated, as ml-tarflow's option does.
- STARFlow (Gu et al.): treat the block's conditional as the Gaussian N(b, exp(a)^2) and sample p_c^(1+w) / p_u^w,
  which is again Gaussian; s = min(sigma_c / sigma_u, 1)^2 keeps its precision positive. By default applied only
  in the block next to the prior (the deep block), where the Gaussian reading is exact; `blocks="all"` guides every
  conditioned block, as ml-starflow does when every block sees the label. `guide_what` keeps the conditional
  sigma (without "a") or mean (without "b").
`attn_temp` divides the attention logits of the unconditional pass by a temperature (ml-tarflow's `attn_temp`); 1 is
no change. `attn_temp_on="all"` divides them in every sampling pass instead (both halves of a guided batch and the
unguided blocks), as ml-starflow's sampler does.
ml-starflow's annealed guidance computes the ramped weight r * w but hands w to its Gaussian rule, so annealing
changes nothing there (and its sampler turns it off); `anneal` here does ramp the weight for both methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    method: str = "none"  # none | tarflow | starflow
    weight: float = 0.0
    anneal: bool = False
    guide_what: str = "ab"  # a | b | ab
    attn_temp: float = 1.0  # attention temperature of the unconditional pass
    blocks: str = "auto"  # auto (tarflow: all, starflow: deep) | all (every conditioned block) | deep (block N only)
    attn_temp_on: str = "uncond"  # uncond (ml-tarflow) | all (every sampling pass, ml-starflow)

    @classmethod
    def of(cls, g) -> "Guidance":
        """The rule a params `sample.guidance` section describes."""
        return cls(g.method, g.weight, g.anneal, g.guide_what, g.attn_temp, g.blocks, g.attn_temp_on)

    def __post_init__(self):
        if self.method not in ("none", "tarflow", "starflow"):
            raise ValueError(f"guidance method must be none, tarflow or starflow, got {self.method!r}")
        if self.weight < 0:
            raise ValueError(f"guidance weight must be >= 0, got {self.weight}")
        if self.guide_what not in ("a", "b", "ab"):
            raise ValueError(f"guide_what must be 'a', 'b' or 'ab', got {self.guide_what!r}")
        if not self.attn_temp > 0:
            raise ValueError(f"attn_temp must be > 0, got {self.attn_temp}")
        if self.blocks not in ("auto", "all", "deep"):
            raise ValueError(f"guidance blocks must be auto, all or deep, got {self.blocks!r}")
        if self.attn_temp_on not in ("uncond", "all"):
            raise ValueError(f"attn_temp_on must be uncond or all, got {self.attn_temp_on!r}")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.weight > 0

    def applies_to(self, block_index: int, num_blocks: int) -> bool:
        """block_index is 1-based in forward order; block N is first in generation. Unconditioned blocks are never
        guided whatever this says (they have no conditional to contrast)."""
        if not self.active:
            return False
        blocks = self.blocks if self.blocks != "auto" else ("all" if self.method == "tarflow" else "deep")
        return blocks == "all" or block_index == num_blocks

    def weight_at(self, step: int, num_tokens: int) -> float:
        """Weight of decoding step `step`, which produces token step + 1 (step -1: token 0, with a start token)."""
        if not self.anneal:
            return self.weight
        return (step + 1) / (num_tokens - 1) * self.weight

    def token_weights(self, num_tokens: int, device=None) -> torch.Tensor:
        """(1, T, 1) weights of tokens 0..T-1 for a parallel pass, equal to the sequential steps' weights."""
        w = [self.weight_at(j - 1, num_tokens) for j in range(num_tokens)]
        return torch.tensor(w, dtype=torch.float32, device=device).view(1, -1, 1)

    def temperature(self, batch: int, guided: bool, device=None) -> torch.Tensor | None:
        """Per-row attention temperature of a block's sampling batch: (2B,) for a guided [cond; uncond] batch, (B,)
        for an unguided one; None when no row is changed."""
        if self.attn_temp == 1.0 or (not guided and self.attn_temp_on == "uncond"):
            return None
        t = torch.full((2 * batch if guided else batch,), float(self.attn_temp), device=device)
        if guided and self.attn_temp_on == "uncond":
            t[:batch] = 1.0
        return t

    def uncond_temperature(self, batch: int, device=None) -> torch.Tensor | None:
        """(2B,) per-row attention temperature of a guided [cond; uncond] batch, or None when attn_temp is 1."""
        return self.temperature(batch, True, device)

    def combine(self, a_c, b_c, a_u, b_u, w) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided (log sigma, mu) from the conditional and unconditional ones; w a float or a broadcastable tensor."""
        if self.method == "tarflow":
            a = a_c + w * (a_c - a_u) if "a" in self.guide_what else a_c
            b = b_c + w * (b_c - b_u) if "b" in self.guide_what else b_c
            return a, b
        # starflow: Gaussian product in the scale/mean parameterisation, computed in fp32
        a_c, b_c, a_u, b_u = (t.float() for t in (a_c, b_c, a_u, b_u))
        s = torch.exp(2 * torch.clamp(a_c - a_u, max=0.0))
        denom = 1 + w - w * s
        a = a_c - 0.5 * torch.log(denom) if "a" in self.guide_what else a_c
        b = ((1 + w) * b_c - w * s * b_u) / denom if "b" in self.guide_what else b_c
        return a, b
