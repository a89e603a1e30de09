"""Augmentation for the small helper networks trained on the embedded digits (the metric network, the encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image of (B, C, H, W) by up to `max_shift` pixels each way (edge padded): cheap augmentation
    against overfitting a data set of ~1,400 images. Draws 2B integers from `gen`: B row, then B column shifts."""
    B, C, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dy, dx = torch.randint(0, 2 * p + 1, (2, B), generator=gen)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(B)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)
