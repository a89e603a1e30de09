"""Frozen networks: feature extractors, encoders and losses that are used inside training but never trained."""

from __future__ import annotations

from torch import nn


class Frozen(nn.Module):
    """A module that stays in eval mode with no gradients for its weights: a parent's `.train()` cannot switch on its
    dropout or batch-norm statistics updates (which would change the numbers it computes mid-run). Subclasses call
    `self.freeze()` at the end of `__init__`."""

    def freeze(self) -> "Frozen":
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Frozen":
        return super().train(False)
