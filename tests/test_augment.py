"""Augmentation of the helper networks' training data."""

import torch

from flowback.data.augment import random_shift


def test_random_shift_moves_each_image_by_at_most_one_pixel():
    x = torch.zeros(64, 2, 8, 8)
    x[:, :, 4, 3] = 1.0
    x[:, 1] *= 2
    out = random_shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = set()
    for img in out:
        (r, c), = torch.nonzero(img[0]).tolist()
        assert img[1, r, c] == 2.0 and img.sum() == 3.0  # channels move together, nothing else appears
        shifts.add((r - 4, c - 3))
    assert shifts == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
