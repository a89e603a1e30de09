"""Where alignment gradients may flow: Forward (F-REPA), Detach (D-REPA) and Reverse (R-REPA).

Let x^{t-1} be the input of block t (forward numbering, x^0 = data, x^N = z) and h^{t,l} the residual stream after
layer l of block t's transformer, which reads x^{t-1}.

- forward: h^{t,l} from the density pass itself. Gradients reach block t's layers 1..l (and its embeddings) and,
  through x^{t-1}, every block before t.
- detach:  h^{t,l} recomputed on stop_grad(x^{t-1}). Gradients reach block t's layers 1..l and embeddings only.
- reverse: z is detached and the generative path z -> x is run down to block t; h^{t,l} is read on the block input
  that path reconstructs. Gradients reach blocks t+1..N (through the reconstruction) and block t (its affine
  parameters and its layers 1..l); never blocks 1..t-1, and never the density pass.

On the generative path each token's affine parameters are computed from the already generated tokens, which the
paper treats as a cached, stop-gradient context. The pseudo-reverse exploits that the forward pass has already
computed those tokens (by invertibility they equal the block inputs): one parallel, teacher-forced pass over the
cached stop_grad(x^{t-1}) gives every token's (a, b) at once, and u = v * exp(a) + b rebuilds the reverse graph
with no sequential loop. `naive_reverse_features` runs the real token-by-token inverse (KV-cached) from z and is
the reference the pseudo-reverse is tested against; with `detach_context=False` it instead keeps the gradient
through the context too (the exact derivative of the inverse map), which is not what the paper trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.tarflow import FlowOutput, TARFlow

STRATEGIES = ("forward", "detach", "reverse")


@dataclass(frozen=True)
class AlignSpec:
    strategy: str
    positions: tuple[tuple[int, int], ...]  # (block, layer), 1-indexed, forward numbering
    reverse_impl: str = "pseudo"  # pseudo | naive (reference, sequential)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"alignment strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not self.positions:
            raise ValueError("alignment needs at least one (block, layer) position")
        if self.reverse_impl not in ("pseudo", "naive"):
            raise ValueError(f"reverse_impl must be 'pseudo' or 'naive', got {self.reverse_impl!r}")
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
    return pseudo_reverse_features(model, out, conds, spec)


def _read(blk, u_block_order: torch.Tensor, cond, layers: frozenset[int]) -> dict[int, torch.Tensor]:
    """Hidden states after `layers` of a block on block-order input, only running as deep as needed."""
    _, hidden = blk.transformer(u_block_order, cond, keep=layers, stop=max(layers))
    return hidden


def detach_features(model, out, conds, spec):
    feats = {}
    for b in sorted({b for b, _ in spec.positions}):
        blk = model.blocks[b - 1]
        u = blk.permute(out.block_inputs[b - 1].detach())
        feats.update({(b, l): h for l, h in _read(blk, u, conds[b - 1], spec.layers_at(b)).items()})
    return feats


def pseudo_reverse_features(model, out, conds, spec):
    """Parallel reverse: (a, b) from one pass over each block's cached, detached input; u = v * exp(a) + b."""
    feats = {}
    lowest = min(b for b, _ in spec.positions)
    v = out.z.detach()
    for b in range(len(model.blocks), lowest - 1, -1):
        blk = model.blocks[b - 1]
        context = blk.permute(out.block_inputs[b - 1].detach())
        a, shift, _ = blk.shifted_affine(context, conds[b - 1])
        u = blk.permute(v) * torch.exp(a.float()).to(v.dtype) + shift  # equals `context` in value
        layers = spec.layers_at(b)
        if layers:
            feats.update({(b, l): h for l, h in _read(blk, u, conds[b - 1], layers).items()})
        v = blk.permute(u)
    return feats


def naive_reverse_features(model, out, conds, spec, detach_context: bool = True):
    """Reference: the real autoregressive inverse from z, one token at a time with a (differentiable) KV cache."""
    feats = {}
    lowest = min(b for b, _ in spec.positions)
    v = out.z.detach()
    for b in range(len(model.blocks), lowest - 1, -1):
        blk = model.blocks[b - 1]
        vb = blk.permute(v)
        T = vb.shape[1]
        caches = blk.new_caches(T, differentiable=True)
        tokens = [vb[:, :1]]
        for i in range(T - 1):
            ctx = tokens[i].detach() if detach_context else tokens[i]
            a, shift = blk.step(ctx, i, conds[b - 1], caches)
            tokens.append(vb[:, i + 1 : i + 2] * torch.exp(a.float()).to(vb.dtype) + shift)
        u = torch.cat(tokens, dim=1)
        layers = spec.layers_at(b)
        if layers:
            feats.update({(b, l): h for l, h in _read(blk, u, conds[b - 1], layers).items()})
        v = blk.permute(u)
    return feats
