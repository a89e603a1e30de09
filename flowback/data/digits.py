"""The embedded default data set: scikit-learn's 8x8 handwritten digits.

Why this data set: the default profile must run end to end on a laptop with no network access. `load_digits()`
ships inside scikit-learn (1797 real, labelled 8x8 grayscale images, 10 classes), so it needs no download, no
mirror and no licence step, yet it is real data with real class structure for class-conditional generation.

Conversion (deterministic): pixel values 0..16 -> round(v * 255 / 16) as uint8, then PIL bicubic upsampling
8x8 -> SxS (PIL clips to 0..255). Images are uint8 NCHW with one channel (see flowback/data/images.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NATIVE_SIZE = 8
NUM_CLASSES = 10


def load_digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (uint8 images (N, 1, S, S), int64 labels (N,)), S = image_size >= 8."""
    if int(image_size) != image_size or image_size < NATIVE_SIZE:
        raise ValueError(f"image_size must be an integer >= {NATIVE_SIZE}, got {image_size!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.asarray(digits.images, dtype=np.float64)  # (N, 8, 8), values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    # Half-up rounding, written out so it does not depend on numpy's round-half-to-even.
    u8 = np.clip(np.floor(raw * 255.0 / 16.0 + 0.5), 0, 255).astype(np.uint8)
    if image_size == NATIVE_SIZE:
        images = u8
    else:
        size = (int(image_size), int(image_size))
        images = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BICUBIC)) for im in u8])
    return np.ascontiguousarray(images[:, None, :, :], dtype=np.uint8), labels


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split -> (sorted train indices, sorted val indices), disjoint and covering all.

    Each class c with n_c >= 2 samples puts round(n_c * val_fraction) of them (at least 1, at most n_c - 1) in val;
    which ones is drawn from numpy's PCG64 seeded with `seed`, class by class in increasing class order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(np.floor(len(idx) * val_fraction + 0.5))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val_parts.append(rng.permutation(idx)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val.astype(np.int64)
