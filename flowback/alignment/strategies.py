"""Where alignment gradients may flow: Forward (F-REPA), Detach (D-REPA) and Reverse (R-REPA).

Let x^{t-1} be the input of block t (forward numbering, x^0 = data, x^N = z) and h^{t,l} the residual stream after
layer l of block t's transformer, which reads x^{t-1}.

- forward: h^{t,l} from the density pass itself. Gradients reach block t's layers 1..l (and its embeddings) and,
  through x^{t-1}, every block before t.
- detach:  h^{t,l} recomputed on stop_grad(x^{t-1}). Gradients reach block t's layers 1..l and embeddings only.
- reverse: z is detached and the generative path z -> x is run down to block t; h^{t,l} is read on the block input
  that path reconstructs. Gradients reach blocks t+1..N (through the reconstruction) and block t (its affine
  parameters and its layers 1..l); never blocks 1..t-1, and never the density pass.

On the generative path each token's affine parameters are computed from the already generated tokens. Which
dependences the reverse gradient keeps is `reverse_grad` (paper | exact | newest, see `reverse.py` and
docs/reverse-gradient.md); `reverse_impl: naive` runs the real token-by-token inverse instead of the parallel
computation (the tests' reference, and the benchmark's baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.tarflow import FlowOutput, TARFlow
from .choices import REVERSE_GRADS, STRATEGIES
from .reverse import PARALLEL, _read, naive_reverse_features



@dataclass(frozen=True)
class AlignSpec:
    strategy: str
    positions: tuple[tuple[int, int], ...]  # (block, layer), 1-indexed, forward numbering
    reverse_impl: str = "pseudo"  # pseudo (parallel) | naive (reference: the real sequential inverse)
    reverse_grad: str = "paper"  # paper | exact | newest: which dependences the reverse gradient keeps
    reverse_tol: float = 0.0  # exact/newest: adjoint sweeps stop at this relative change (0: when it stops changing)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"alignment strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not self.positions:
            raise ValueError("alignment needs at least one (block, layer) position")
        if self.reverse_impl not in ("pseudo", "naive"):
            raise ValueError(f"reverse_impl must be 'pseudo' or 'naive', got {self.reverse_impl!r}")
        if self.reverse_grad not in REVERSE_GRADS:
            raise ValueError(f"reverse_grad must be one of {REVERSE_GRADS}, got {self.reverse_grad!r}")
        if not self.reverse_tol >= 0:
            raise ValueError(f"reverse_tol must be >= 0, got {self.reverse_tol!r}")
        object.__setattr__(self, "positions", tuple(sorted({(int(b), int(l)) for b, l in self.positions})))

    def layers_at(self, block: int) -> frozenset[int]:
        return frozenset(l for b, l in self.positions if b == block)

    @property
    def forward_keep(self) -> dict[int, set[int]]:
        """Hidden states the density pass must return (forward strategy only)."""
        if self.strategy != "forward":
            return {}
        return {b: set(self.layers_at(b)) for b, _ in self.positions}

    @property
    def needs_block_inputs(self) -> bool:
        return self.strategy in ("detach", "reverse")

    @staticmethod
    def key(position: tuple[int, int]) -> str:
        return f"block{position[0]}_layer{position[1]}"


def alignment_features(
    model: TARFlow, out: FlowOutput, conds: list[torch.Tensor | None], spec: AlignSpec
) -> dict[tuple[int, int], torch.Tensor]:
    """Features (B, T, W) in spatial token order for every aligned position, with the strategy's gradient path.

    `out` must come from `model(x, y, keep=spec.forward_keep, keep_inputs=spec.needs_block_inputs)` and `conds`
    from `model.conditions(y, None, B)` with the same (label-dropped) y.
    """
    if spec.strategy == "forward":
        return {p: out.hidden[p] for p in spec.positions}
    if spec.strategy == "detach":
        return detach_features(model, out, conds, spec)
    if spec.reverse_impl == "naive":
        return naive_reverse_features(model, out, conds, spec)
    return PARALLEL[spec.reverse_grad](model, out, conds, spec)


def detach_features(model, out, conds, spec):
    feats = {}
    for b in sorted({b for b, _ in spec.positions}):
        blk = model.blocks[b - 1]
        u = blk.permute(out.block_inputs[b - 1].detach())
        feats.update({(b, l): h for l, h in _read(blk, u, conds[b - 1], spec.layers_at(b)).items()})
    return feats
