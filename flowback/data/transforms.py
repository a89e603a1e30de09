"""Decode a source image and make the square crop the model trains on.

Two crops, named after the code bases whose numbers we compare with:

- "tarflow": what TARFlow's ImageNet loader does (torchvision `Resize(size)` then `CenterCrop(size)` on a PIL image):
  the shorter side goes to `size` with PIL's bilinear filter (PIL filters with the full support when downsampling,
  i.e. antialiased), then the centre `size` x `size` is cut. We call torchvision's own functions.
- "adm": ADM's `center_crop_arr` (guided-diffusion, also used by REPA/SiT for 256 px latents): halve with a box filter
  while the shorter side is at least twice the target, then bicubic to make the shorter side exactly `size`, then
  cut the centre. No library exposes it, so it is written out here (a few lines) and tested against its definition.

Images are converted to RGB (grayscale and CMYK JPEGs exist in ImageNet). A file PIL cannot decode raises
`UndecodableImage`, which `prepare` turns into an error naming the file, or a counted skip.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

RESIZE_METHODS = ("tarflow", "adm")


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can decode (truncated, corrupted, not an image)."""


def decode_rgb(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UndecodableImage(f"{type(e).__name__}: {e}") from e


def tarflow_crop(im: Image.Image, size: int) -> Image.Image:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    im = TF.resize(im, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(im, [size, size])


def adm_crop(im: Image.Image, size: int) -> Image.Image:
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def crop_square(im: Image.Image, size: int, method: str) -> np.ndarray:
    """PIL RGB image -> uint8 (3, size, size)."""
    if method == "tarflow":
        im = tarflow_crop(im, size)
    elif method == "adm":
        im = adm_crop(im, size)
    else:
        raise ValueError(f"unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise AssertionError(f"crop gave {arr.shape}, expected ({size}, {size}, 3)")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
