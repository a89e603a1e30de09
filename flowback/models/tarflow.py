"""TARFlow: a normalizing flow made of causal-transformer autoregressive affine blocks (Zhai et al., 2024).

Forward (density) direction, for block t = 1..N in turn, on a sequence of T patch tokens:
    u = permute_t(x)                       (identity for odd t, reversed token order for even t)
    (a_i, b_i) = transformer_t(u_<i)       (causal; token 0 gets a = b = 0)
    v_i = (u_i - b_i) * exp(-a_i)          log|det| = -sum_i a_i
The prior is N(0, I) on the last block's output z. Inverse (generation) runs the blocks N..1, each one token at a
time: u_i = v_i * exp(a_i) + b_i, where a_i, b_i need u_<i, so the loop is sequential (KV-cached in `sampling`).

STARFlow's deep-shallow layout is a per-block layer count (the deep block is block N, nearest the prior), and
`cond_blocks="deep"` conditions only that block. Class conditioning adds a per-block class embedding to every token;
a dropped label (y < 0) and unconditional passes use the mean of the class embeddings, so softmax(0)^T E, the
training-free classifier's starting point, is exactly the unconditional embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .transformer import KVCache, Layer

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class FlowConfig:
    channels: int
    image_size: int
    patch_size: int
    width: int
    layers: tuple[int, ...]  # per block, forward order; a single deep last block = STARFlow's deep-shallow layout
    head_dim: int = 64
    mlp_ratio: int = 4
    num_classes: int = 0
    pos_embed: str = "learned"  # learned | sincos
    cond_blocks: str = "all"  # all | deep

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if self.cond_blocks not in ("all", "deep"):
            raise ValueError(f"cond_blocks must be 'all' or 'deep', got {self.cond_blocks!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def dims(self) -> int:
        return self.channels * self.image_size**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlowConfig":
        return cls(**d)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (grid*grid, width), row-major, as in MAE."""
    if width % 4:
        raise ValueError(f"sincos position embedding needs width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        ang = coord[:, None] * omega[None]
        out += [ang.sin(), ang.cos()]
    return torch.cat(out, dim=1).float()


@dataclass
class FlowOutput:
    z: torch.Tensor  # (B, T, D) last block output, spatial token order
    logdet: torch.Tensor  # (B,) sum over blocks of log|det|
    block_inputs: list[torch.Tensor] = field(default_factory=list)  # block_inputs[t-1] = input of block t
    hidden: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (block, layer) -> (B, T, W)


class FlowBlock(nn.Module):
    """One autoregressive affine flow: permutation, causal transformer, shifted affine output."""

    def __init__(self, cfg: FlowConfig, layers: int, flip: bool, conditioned: bool):
        super().__init__()
        self.flip = flip
        self.proj_in = nn.Linear(cfg.token_dim, cfg.width)
        if cfg.pos_embed == "learned":
            self.pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.width) * 1e-2)
        else:
            self.register_buffer("pos", sincos_2d(cfg.grid, cfg.width), persistent=False)
        self.class_embed = (
            nn.Parameter(torch.randn(cfg.num_classes, cfg.width) * 1e-2) if conditioned and cfg.num_classes else None
        )
        self.layers = nn.ModuleList(Layer(cfg.width, cfg.head_dim, cfg.mlp_ratio) for _ in range(layers))
        self.proj_out = nn.Linear(cfg.width, 2 * cfg.token_dim)
        nn.init.zeros_(self.proj_out.weight)  # identity map at initialisation
        nn.init.zeros_(self.proj_out.bias)

    # -- token order ------------------------------------------------------------------------------------------
    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial token order <-> this block's processing order (an involution)."""
        return x.flip(1) if self.flip else x

    # -- conditioning -----------------------------------------------------------------------------------------
    def condition(self, y: torch.Tensor | None, class_weights: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """(B, W) class embedding, or None for an unconditioned block.

        y < 0 (a dropped label) and y=None use the mean embedding; class_weights (B, K) mix embeddings.
        """
        E = self.class_embed
        if E is None:
            return None
        if class_weights is not None:
            return class_weights.to(E.dtype) @ E
        mean = E.mean(dim=0)
        if y is None:
            return mean.expand(batch, -1)
        picked = E[y.clamp(min=0)]
        return torch.where((y >= 0)[:, None], picked, mean)

    # -- transformer pieces -----------------------------------------------------------------------------------
    def position(self, start: int, n: int) -> torch.Tensor:
        """Embeddings of block-order positions start..start+n-1, each the embedding of its spatial token (a
        slice, so a cached decoding step does not copy the whole table)."""
        if not self.flip:
            return self.pos[start : start + n]
        T = self.pos.shape[0]
        return self.pos[T - start - n : T - start].flip(0)

    def embed(self, u: torch.Tensor, cond: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """u: tokens in block order (B, n, D) starting at position `start`."""
        h = self.proj_in(u) + self.position(start, u.shape[1])
        if cond is not None:
            h = h + cond[:, None, :]
        return h

    def affine(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unshifted (a, b): position i predicts token i+1."""
        a, b = self.proj_out(h).chunk(2, dim=-1)
        return a, b

    @staticmethod
    def shift(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(p[:, :1]), p[:, :-1]], dim=1)

    def transformer(
        self, u: torch.Tensor, cond: torch.Tensor | None, keep: frozenset[int] = frozenset(), stop: int | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run layers 1..stop (all by default) on block-order tokens u; return the last hidden state and the
        residual streams after the layers in `keep` (1-indexed), put back into spatial token order."""
        h = self.embed(u, cond)
        hidden = {}
        for l, layer in enumerate(self.layers[:stop], start=1):
            h = layer(h)
            if l in keep:
                hidden[l] = self.permute(h)
        return h, hidden

    def shifted_affine(self, u: torch.Tensor, cond: torch.Tensor | None, keep: frozenset[int] = frozenset()):
        """(a, b) for every token of block-order u, computed in parallel (teacher forcing), plus kept hiddens."""
        h, hidden = self.transformer(u, cond, keep)
        a, b = self.affine(h)
        return self.shift(a), self.shift(b), hidden

    # -- flow maps --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, keep: frozenset[int] = frozenset()):
        """x (spatial order) -> (v in spatial order, log|det| per sample, kept hiddens)."""
        u = self.permute(x)
        a, b, hidden = self.shifted_affine(u, cond, keep)
        v = (u - b) * torch.exp(-a.float()).to(u.dtype)
        logdet = -a.float().sum(dim=(1, 2))
        return self.permute(v), logdet, hidden

    def step(self, u_i: torch.Tensor, i: int, cond: torch.Tensor | None, caches: list[KVCache]):
        """One cached decoding step: token i (block order, (B,1,D)) in, unshifted (a, b) for token i+1 out."""
        h = self.embed(u_i, cond, start=i)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cache)
        return self.affine(h)

    def step_uncached(self, u_prefix: torch.Tensor, cond: torch.Tensor | None):
        """Reference for `step`: recompute the whole prefix u_0..u_i and read the last position."""
        h, _ = self.transformer(u_prefix, cond)
        a, b = self.affine(h[:, -1:])
        return a, b

    def new_caches(self, max_len: int, differentiable: bool = False) -> list[KVCache]:
        return [KVCache(max_len, differentiable) for _ in self.layers]


class TARFlow(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.layers)
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, depth, flip=bool(t % 2), conditioned=(cfg.cond_blocks == "all" or t == n - 1))
            for t, depth in enumerate(cfg.layers)
        )

    # -- layout -----------------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, C*p*p), tokens in row-major order."""
        B, C, H, W = x.shape
        p, g = self.cfg.patch_size, self.cfg.grid
        if (C, H, W) != (self.cfg.channels, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images of shape {(self.cfg.channels, self.cfg.image_size, self.cfg.image_size)}"
                             f", got {tuple(x.shape[1:])}")
        return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        p, g, C = self.cfg.patch_size, self.cfg.grid, self.cfg.channels
        return x.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)

    def conditions(self, y, class_weights, batch) -> list[torch.Tensor | None]:
        return [blk.condition(y, class_weights, batch) for blk in self.blocks]

    # -- density ----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
        keep: dict[int, set[int]] | None = None,
        keep_inputs: bool = False,
    ) -> FlowOutput:
        """Images (B, C, H, W) -> FlowOutput. keep={block: {layers}} (1-indexed) returns those hidden states."""
        keep = keep or {}
        h = self.patchify(x)
        conds = self.conditions(y, class_weights, x.shape[0])
        out = FlowOutput(z=h, logdet=torch.zeros(x.shape[0], device=x.device))
        for t, (blk, cond) in enumerate(zip(self.blocks, conds), start=1):
            if keep_inputs:
                out.block_inputs.append(h)
            h, logdet, hidden = blk(h, cond, frozenset(keep.get(t, ())))
            out.logdet = out.logdet + logdet
            out.hidden.update({(t, l): v for l, v in hidden.items()})
        out.z = h
        return out

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None, class_weights: torch.Tensor | None = None):
        """log p(x | y) per sample, in nats, summed over all dimensions."""
        out = self(x, y, class_weights)
        return log_prob_from(out)

    def nll_per_dim(self, out: FlowOutput) -> torch.Tensor:
        """The training loss: mean over the batch of -log p / D (nats)."""
        return -(log_prob_from(out) / self.cfg.dims).mean()

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "weights": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "TARFlow":
        model = cls(FlowConfig.from_dict(state["config"]))
        model.load_state_dict(state["weights"])
        return model


def log_prob_from(out: FlowOutput) -> torch.Tensor:
    z = out.z.float()
    d = z[0].numel()
    return -0.5 * z.pow(2).sum(dim=(1, 2)) - 0.5 * d * LOG_2PI + out.logdet


def bits_per_dim(nll_per_dim: torch.Tensor | float, data_range_bins: int = 256) -> torch.Tensor | float:
    """Discrete bits/dim of 8-bit data scaled to [-1, 1]: a bin is 2/256 wide, so add log(128) nats."""
    return (nll_per_dim + math.log(data_range_bins / 2)) / math.log(2)
