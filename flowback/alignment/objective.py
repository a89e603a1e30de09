"""The training objective of a flow, built from an experiment in one place (training, the memory plan, benches and
tests all call `Objective.of`): NLL in nats/dim + lambda * the alignment loss of the experiment's strategy at its
positions (+ STARFlow's latent-norm term), and the alignment targets (frozen-encoder patch features) per batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batches import Batch
from ..data.images import to_model
from ..models.tarflow import TARFlow, latent_norm_penalty
from ..params import Experiment
from .encoder import FrozenEncoder
from .loss import Projector, combine_positions, encoder_input_size, position_loss, target_tokens
from .strategies import AlignSpec, alignment_features


def align_spec(exp: Experiment) -> AlignSpec | None:
    """The experiment's alignment: strategy, positions and the reverse gradient's variant (None: no alignment)."""
    if exp.strategy == "none":
        return None
    a = exp.params.align
    return AlignSpec(exp.strategy, tuple(exp.positions), reverse_grad=a.reverse_grad, reverse_tol=a.reverse_tol)


def make_projectors(spec: AlignSpec | None, width: int, hidden: int, enc_dim: int) -> nn.ModuleDict:
    if spec is None:
        return nn.ModuleDict()
    return nn.ModuleDict({AlignSpec.key(p): Projector(width, hidden, enc_dim) for p in spec.positions})


def objective(model: TARFlow, projectors: nn.ModuleDict, spec: AlignSpec | None, x: torch.Tensor, y: torch.Tensor,
              targets: torch.Tensor | None, weight: float, latent_weight: float = 0.0,
              reduce: str = "mean", latent_form: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's loss = NLL (nats/dim) + weight * the alignment loss over positions (their mean or sum, `reduce`)
    (+ latent_weight * STARFlow's latent-norm term in `latent_form`); returns (loss, nll, align)."""
    out = model(x, y, keep=spec.forward_keep if spec else None, keep_inputs=bool(spec and spec.needs_block_inputs))
    nll = model.nll_per_dim(out)
    base = nll + latent_weight * latent_norm_penalty(out, latent_form) if latent_weight else nll
    if spec is None:
        return base, nll, torch.zeros((), device=x.device)
    feats = alignment_features(model, out, model.conditions(y, None, len(x)), spec)
    align = combine_positions([position_loss(projectors[AlignSpec.key(k)], h, targets) for k, h in feats.items()],
                              reduce)
    return base + weight * align, nll, align


class Objective(nn.Module):
    """The whole training loss as one module, so DDP sees every parameter used inside one forward call (the
    alignment strategies call into the flow's blocks again after its forward pass)."""

    def __init__(self, model: TARFlow, projectors: nn.ModuleDict, spec: AlignSpec | None, weight: float,
                 latent_weight: float = 0.0, reduce: str = "mean", latent_form: str = "mean"):
        super().__init__()
        self.model, self.projectors, self.spec, self.weight = model, projectors, spec, weight
        self.latent_weight, self.reduce, self.latent_form = latent_weight, reduce, latent_form

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None):
        return objective(self.model, self.projectors, self.spec, x, y, targets, self.weight, self.latent_weight,
                         self.reduce, self.latent_form)

    @classmethod
    def of(cls, exp: Experiment, model: TARFlow, projectors: nn.ModuleDict) -> "Objective":
        """The objective experiment `exp` trains: its strategy, positions, weight and reduction, and the latent-norm
        term's weight."""
        spec, p = align_spec(exp), exp.params
        return cls(model, projectors, spec, p.align.weight if spec else 0.0, p.train.latent_norm_weight,
                   p.align.position_reduce if spec else "mean", p.train.latent_norm_form)



@torch.no_grad()
def encode_targets(encoder: FrozenEncoder, images_u8: torch.Tensor, grid: int, rule: str = "upsample",
                   batch: int = 256) -> torch.Tensor:
    """Encoder patch features of clean images as alignment targets (N, n, E): on the flow's token grid (upsample,
    dino448) or on the encoder's own coarser grid (pool), see alignment/loss.py."""
    out = [target_tokens(encoder(to_model(images_u8[i : i + batch])), grid, rule).float()
           for i in range(0, len(images_u8), batch)]
    return torch.cat(out)


class AlignTargets:
    """The alignment targets of a batch: cached per image for a fixed in-memory set (its encoder features once),
    computed per step under the training autocast for streamed data."""

    def __init__(self, encoder: FrozenEncoder, grid: int, device: torch.device, autocast: dict,
                 fixed_images: torch.Tensor | None = None, rule: str = "upsample"):
        size = encoder_input_size(rule, grid, encoder.patch_size, encoder.cfg.input_size)
        self.encoder, self.grid, self.rule, self.autocast = encoder.resize_input(size).to(device), grid, rule, autocast
        self.cache = None
        if fixed_images is not None:
            with torch.autocast(**autocast):
                self.cache = encode_targets(self.encoder, fixed_images.to(device), grid, rule)

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[batch.index]
        with torch.autocast(**self.autocast):
            return encode_targets(self.encoder, batch.pixels, self.grid, self.rule)

