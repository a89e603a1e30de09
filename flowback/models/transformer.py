"""Pre-LN causal transformer layers with an optional key/value cache for token-by-token decoding.

The cache has two modes. Inference (no autograd) writes into preallocated buffers, so decoding T tokens costs
O(T) memory traffic per layer instead of the O(T^2) that re-concatenating would cost. With autograd on (the naive
reverse used as a reference for the pseudo-reverse) in-place writes would invalidate saved tensors, so it keeps a
list and concatenates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys/values of the tokens decoded so far, for one attention layer. Shapes are (B, heads, T, head_dim)."""

    def __init__(self, max_len: int, differentiable: bool = False):
        self.max_len = max_len
        self.differentiable = differentiable
        self.length = 0
        self._k: torch.Tensor | list[torch.Tensor] | None = None
        self._v: torch.Tensor | list[torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the newest token's k/v (B, H, 1, d); return all cached keys and values so far."""
        n = k.shape[2]
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length + n} > {self.max_len} tokens")
        if self.differentiable:
            if self._k is None:
                self._k, self._v = [], []
            self._k.append(k)
            self._v.append(v)
            self.length += n
            return torch.cat(self._k, dim=2), torch.cat(self._v, dim=2)
        if self._k is None:
            B, H, _, d = k.shape
            self._k = k.new_empty(B, H, self.max_len, d)
            self._v = v.new_empty(B, H, self.max_len, d)
        self._k[:, :, self.length : self.length + n] = k
        self._v[:, :, self.length : self.length + n] = v
        self.length += n
        return self._k[:, :, : self.length], self._v[:, :, : self.length]


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int, causal: bool = True):
        super().__init__()
        self.causal = causal  # False: every token attends to every token (the AF / DiT networks)
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
        self.heads = width // head_dim
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        h = self.norm(x.float()).to(x.dtype)  # LayerNorm in fp32, as TARFlow does under bf16 autocast
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            if T != 1 and cache.length != 0:
                raise ValueError("a cached step takes one token at a time")
            causal = T > 1  # a first multi-token call is an ordinary causal pass that fills the cache
            k, v = cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * ratio)
        self.fc2 = nn.Linear(width * ratio, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x.float()).to(x.dtype))))


class Layer(nn.Module):
    """x + attn(LN x), then x + mlp(LN x)."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.attn = Attention(width, head_dim)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(x, cache)
        return x + self.mlp(x)
