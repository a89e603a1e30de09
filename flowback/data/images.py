"""One convention for image tensors everywhere in FlowBack.

- Stored and exchanged images are uint8. In memory they are NCHW; sample files are NHWC (the ADM .npz format:
  `arr_0` uint8 NHWC, `arr_1` int64 labels).
- Models see float32 in [-1, 1]: x = u8 / 127.5 - 1.
- Model outputs go back to uint8 the way ADM samplers do: ((x + 1) * 127.5).clamp(0, 255) then truncation.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model(u8: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(u8)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    return t.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def nchw_to_nhwc(x: np.ndarray | torch.Tensor):
    return x.permute(0, 2, 3, 1) if isinstance(x, torch.Tensor) else np.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: np.ndarray | torch.Tensor):
    return x.permute(0, 3, 1, 2) if isinstance(x, torch.Tensor) else np.transpose(x, (0, 3, 1, 2))
