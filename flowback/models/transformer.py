"""Pre-LN causal transformer layers with an optional key/value cache for token-by-token decoding.

The cache has two modes. Inference (no autograd) writes into preallocated buffers, so decoding T tokens costs
O(T) memory traffic per layer instead of the O(T^2) that re-concatenating would cost. With autograd on (the naive
reverse used as a reference for the pseudo-reverse) in-place writes would invalidate saved tensors, so it keeps a
list and concatenates.

A cache also takes a chunk of several tokens after a prefix (causal within the chunk, full attention to the prefix)
and can be cut back (`truncate`): the Jacobi solvers re-run one segment of tokens against a fixed prefix until it
converges. Two optional inputs leave the default path untouched when absent: 2-D rotary position tables (STARFlow's
RoPE) and a per-row attention temperature (TARFlow's `attn_temp`, used on the unconditional half of a guided batch).
The feed-forward is TARFlow's GELU MLP by default, or a gated one (SwiGLU, or ml-starflow's tanh-GELU gate).
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

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (a Jacobi segment is re-run against the same prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV cache of {self.length} tokens to {length}")
        if self.differentiable and self._k is not None and length < self.length:
            self._k = [torch.cat(self._k, dim=2)[:, :, :length]]
            self._v = [torch.cat(self._v, dim=2)[:, :, :length]]
        self.length = length


def rope_2d(grid: int, head_dim: int, base: float = 10000.0, still_pairs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables (cos, sin), each (grid*grid, head_dim/2), tokens row-major. Dimension pair (j, j + d/2)
    turns by angle theta_j: the first n pairs by the token's row times frequency base^(-j/n), the next n by its
    column, n = (d/2 - still_pairs) / 2. The last `still_pairs` never turn for image tokens: ml-starflow keeps 8 pairs
    for a third (text/class) axis whenever it conditions on a token, which takes them from rows and columns."""
    n, rest = divmod(head_dim // 2 - still_pairs, 2)
    if head_dim % 4 or rest or n < 1:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4 with at least one row and one column pair left after "
                         f"{still_pairs} still pairs, got head_dim {head_dim}")
    freq = 1.0 / base ** (torch.arange(n, dtype=torch.float64) / n)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    still = torch.zeros(grid * grid, still_pairs, dtype=torch.float64)
    theta = torch.cat([ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq, still], dim=1)
    return theta.cos().float(), theta.sin().float()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, H, n, d) queries or keys by the (n, d/2) tables of their positions."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                temp: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C). rope: (cos, sin) tables of these T positions; temp (B,): logits of row b divided by temp[b]."""
        B, T, C = x.shape
        h = self.norm(x.float()).to(x.dtype)  # LayerNorm in fp32, as TARFlow does under bf16 autocast
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if temp is not None:
            q = q / temp.to(q.dtype).view(B, 1, 1, 1)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            prefix = cache.length
            k, v = cache.append(k, v)
            if T == 1 or prefix == 0:  # one new token sees everything; a first chunk is an ordinary causal pass
                out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:  # a chunk after a prefix: token i sees the prefix and chunk tokens 0..i
                mask = torch.ones(T, prefix + T, dtype=torch.bool, device=x.device).tril(diagonal=prefix)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


from .choices import MLPS  # noqa: E402


class MLP(nn.Module):
    """LN, then fc2(act(fc1 h)): TARFlow's GELU MLP (kind "gelu"), or a gated unit fc2(act(g) * u) with
    (g, u) = fc1 h split in halves: "swiglu" gates with SiLU (Shazeer 2020), "geglu" with tanh-GELU, which is what
    ml-starflow's `use_swiglu` computes. The hidden size is width * ratio for every kind, ml-starflow's convention
    (its gated MLP keeps the expansion of its GELU one), so its weights map one to one; a gated MLP then has 1.5x the
    parameters of the GELU one at the same ratio (LLaMA instead shrinks the hidden size to 2/3 of it)."""

    def __init__(self, width: int, ratio: int, kind: str = "gelu"):
        super().__init__()
        if kind not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")
        self.kind = kind
        hidden = width * ratio
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden if kind == "gelu" else 2 * hidden)  # gated: [gate; up]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x.float()).to(x.dtype))
        if self.kind == "gelu":
            return self.fc2(F.gelu(h))
        gate, up = h.chunk(2, dim=-1)
        gate = F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")
        return self.fc2(gate * up)


class Layer(nn.Module):
    """x + attn(LN x), then x + mlp(LN x)."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: int, mlp: str = "gelu"):
        super().__init__()
        self.attn = Attention(width, head_dim)
        self.mlp = MLP(width, mlp_ratio, mlp)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rope=None, temp=None) -> torch.Tensor:
        x = x + self.attn(x, cache, rope, temp)
        return x + self.mlp(x)
