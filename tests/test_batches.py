"""Streamed batches reach the GPU asynchronously: every tensor ShardBatches hands over is the pinned copy of what it
built (a pageable tensor makes `.to(device, non_blocking=True)` wait for the copy)."""

from __future__ import annotations

import numpy as np
import torch

from flowback.data.batches import ShardBatches
from flowback.data.manifest import write_manifest
from flowback.data.writer import write_split


def test_shard_batches_pin_what_they_build(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    images, labels = g.integers(0, 256, (24, 3, 8, 8), dtype=np.uint8), np.arange(24) % 4
    splits = {"train": write_split(tmp_path, "train", images, labels, 12, show_progress=False, num_classes=4)}
    write_manifest(tmp_path, {"dataset": "imagenet", "image_size": 8, "channels": 3, "num_classes": 4,
                              "splits": splits})
    pinned: set[int] = set()

    def pin_memory(t):  # a CPU-only machine cannot page-lock: record which tensors were pinned instead
        out = t.clone()
        pinned.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    for pin in (True, False):
        pinned.clear()
        b = ShardBatches(tmp_path, "train", 8, seed=0, segment=2, shuffle_buffer=0, pin_memory=pin).get(0)
        handed = [t for t in (b.x, b.y, b.index, b.pixels) if t is not None]
        assert len(handed) == 3 and all((id(t) in pinned) == pin for t in handed), pin
