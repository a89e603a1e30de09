"""The REPA alignment objective: a per-token MLP projector and negative cosine similarity to encoder features.

Grids: a flow with a g x g token grid is aligned to an encoder with a G x G patch grid by resizing the encoder's
feature map to g x g (bilinear; area-averaging when shrinking), so every flow token has its own target. For
ImageNet 64 (32 x 32 tokens) and DINOv2 at 224 px (16 x 16 patches) that upsamples the targets 2x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
