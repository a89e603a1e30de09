"""The REPA alignment objective: a per-token MLP projector and negative cosine similarity to encoder features.

Grids (`target_grid`, a choice the paper leaves open): a flow with a g x g token grid meets an encoder with a G x G
patch grid (ImageNet 64: 32 x 32 tokens, DINOv2 at 224 px: 16 x 16 patches) by one of
- upsample (FlowBack's default): the encoder's feature map is resized to g x g (bilinear; area-averaging when
  shrinking), so every flow token has its own target;
- pool: the flow's hidden states are average-pooled to G x G before the projector, one prediction per pooled token;
- dino448: the encoder reads a larger image so that its grid is g x g (DINOv2/14 at 448 px for 32 x 32); the grids
  then match and nothing is resized (`encoder_input_size` gives that size).
Positions: the loss of each aligned position is averaged over batch and tokens; over positions it is averaged
(`position_reduce: mean`, FlowBack's default) or summed (`sum`, which weights "all blocks" 8x "one block").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .choices import POSITION_REDUCE, TARGET_GRIDS


class Projector(nn.Module):
    """REPA's projector: Linear - SiLU - Linear - SiLU - Linear, applied to every token."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def match_grid(target: torch.Tensor, grid: int) -> torch.Tensor:
    """Encoder features (B, G, G, E) -> (B, grid*grid, E), row-major like the flow's tokens."""
    B, G, _, E = target.shape
    if G != grid:
        t = target.permute(0, 3, 1, 2).float()
        mode = "bilinear" if grid > G else "area"
        t = F.interpolate(t, size=(grid, grid), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        target = t.permute(0, 2, 3, 1)
    return target.reshape(B, grid * grid, E)


def alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of -cos(pred, target). Invariant to the scale of either argument."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()




def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def encoder_input_size(rule: str, flow_grid: int, encoder_patch: int, default_size: int) -> int:
    """The square image size the encoder should read: its configured size, or flow_grid * patch for dino448."""
    _check("target_grid", rule, TARGET_GRIDS)
    return flow_grid * encoder_patch if rule == "dino448" else default_size


def target_tokens(features: torch.Tensor, flow_grid: int, rule: str = "upsample") -> torch.Tensor:
    """Encoder features (B, G, G, E) -> the targets (B, n, E) the projector's outputs are compared with."""
    _check("target_grid", rule, TARGET_GRIDS)
    G = features.shape[1]
    if rule == "upsample":
        return match_grid(features, flow_grid)
    if rule == "pool" and flow_grid % G:
        raise ValueError(f"target_grid pool: the flow grid {flow_grid} is not a multiple of the encoder grid {G}")
    if rule == "dino448" and G != flow_grid:
        raise ValueError(f"target_grid dino448: the encoder grid is {G}, not the flow grid {flow_grid}; "
                         f"set the encoder input size with encoder_input_size")
    return features.reshape(features.shape[0], G * G, features.shape[-1])


def flow_tokens(h: torch.Tensor, target_count: int) -> torch.Tensor:
    """Flow hidden states (B, g*g, W) in spatial order -> (B, target_count, W): average-pooled onto the targets'
    grid when that is coarser (target_grid pool), unchanged when the grids match."""
    B, n, W = h.shape
    if n == target_count:
        return h
    g, G = int(round(n**0.5)), int(round(target_count**0.5))
    if g * g != n or G * G != target_count or g % G:
        raise ValueError(f"cannot pool {n} flow tokens onto {target_count} target tokens")
    k = g // G
    return h.reshape(B, G, k, G, k, W).mean(dim=(2, 4)).reshape(B, G * G, W)


def position_loss(projector: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One position's loss: pool the flow tokens onto the targets' grid if needed, project, -cos averaged."""
    return alignment_loss(projector(flow_tokens(h, target.shape[1])), target)


def combine_positions(losses: list[torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """The alignment term over aligned positions: their mean (FlowBack) or their sum."""
    _check("position_reduce", reduce, POSITION_REDUCE)
    stacked = torch.stack(losses)
    return stacked.mean() if reduce == "mean" else stacked.sum()
