"""bench/encoders.py keeps working: its pixel 'features' are the image's patches, and a table row computes."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import encoders  # noqa: E402


def test_pixel_patches_are_the_images_patches():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    patches = encoders.pixel_patches(u8, 4)
    assert patches.shape == (1, 16, 16)
    x = u8.float() / 127.5 - 1
    torch.testing.assert_close(patches[0, 5], x[0, 0, 4:8, 4:8].reshape(-1))  # patch (row 1, col 1)


def test_a_row_computes_every_column():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    feats = torch.randn(40, 4, 8, generator=g) + 3 * torch.nn.functional.one_hot(labels, 8)[:, None].float()
    r = encoders.row("x", feats, feats, labels, labels, None)
    assert float(r["probe"]) == 1.0 and float(r["knn"]) == 1.0 and 0.0 < float(r["class var"]) < 1.0
