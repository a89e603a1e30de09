"""TARFlow: a normalizing flow made of causal-transformer autoregressive affine blocks (Zhai et al., 2024), with
STARFlow's architecture options (Gu et al., 2025), all off by default (then the model is TARFlow as in ml-tarflow).

Forward (density) direction, for block t = 1..N in turn, on a sequence of T patch tokens:
    u = permute_t(x)                       (identity for odd t, reversed token order for even t; L2R swaps)
    (a_i, b_i) = transformer_t(u_<i)       (causal; token 0 gets a = b = 0)
    v_i = (u_i - b_i) * exp(-a_i)          log|det| = -sum_i a_i
The prior is N(0, I) on the last block's output z. Inverse (generation) runs the blocks N..1, each one token at a
time: u_i = v_i * exp(a_i) + b_i, where a_i, b_i need u_<i, so the loop is sequential (KV-cached in `sampling`;
`jacobi` solves the same triangular system by parallel fixed-point iteration).

STARFlow's deep-shallow layout is a per-block layer count (the deep block is block N, nearest the prior), and
`cond_blocks="deep"` conditions only that block. Class conditioning adds a per-block class embedding to every token;
a dropped label (y < 0) and unconditional passes use the mean of the class embeddings, so softmax(0)^T E, the
training-free classifier's starting point, is exactly the unconditional embedding (unless null_class="learned").

STARFlow options (FlowConfig):
- pos_embed="rope": 2-D rotary positions in attention instead of an added embedding.
- start_token: a learned input-space token starts the sequence, so token i is predicted from (start, u_0..u_{i-1})
  and every token, token 0 included, is transformed.
- final_norm: RMSNorm before the output projection.
- scale="softplus": sigma = softplus(a + log(e - 1)) (1 at a = 0) instead of exp(a).
- soft_clip=c > 0: the raw outputs (a, b) become c * tanh(o / c).
- cond_token: the class embedding enters as one prepended context token instead of being added to every token.
Options that make the model ml-starflow's exactly (its weights map one to one, flowback/models/convert.py):
- seq_order="L2R": blocks 1, 3, ... reverse the token order instead of blocks 2, 4, ... (ml-starflow's `seq_order`).
- rope_layout="3d": 8 rotary pairs per head held for a third (class/text) axis, so rows and columns get
  head_dim/4 - 4 pairs each (ml-starflow's layout whenever it conditions on tokens).
- rope_order="sequence": a flipped block turns its i-th processed token by raster position i's angle rather than
  its own spatial token's (ml-starflow computes the angles before permuting the tokens).
- null_class="learned": dropped labels and unconditional passes use a learned null embedding (ml-starflow's label
  embedder has K + 1 entries) instead of the mean class embedding; class_weights still mix the K class embeddings.
- mlp="swiglu" / "geglu": gated feed-forward (transformer.MLP).
Whatever the options, a block exposes one affine rule in terms of (log sigma, mu) per token: `shifted_affine` /
`token_params` give them (in parallel, from the tokens before each), `affine_forward` applies x -> (x - mu) / sigma
with its exact log-det, `affine_inverse` the inverse. The samplers and the alignment code use only these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ROPE_STILL_PAIRS, STARFLOW_DEFAULTS, FlowConfig  # noqa: F401  (their home)
from .transformer import KVCache, Layer, rope_2d

LOG_2PI = math.log(2 * math.pi)
INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(INV_SOFTPLUS_1) = 1: a softplus block starts as the identity

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


def log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log(softplus(x)) without underflow: below -20, softplus(x) = exp(x) to float precision."""
    return torch.where(x < -20, x, F.softplus(x.clamp(min=-20)).log())


@dataclass
class FlowOutput:
    z: torch.Tensor  # (B, T, D) last block output, spatial token order
    logdet: torch.Tensor  # (B,) sum over blocks of log|det|
    block_inputs: list[torch.Tensor] = field(default_factory=list)  # block_inputs[t-1] = input of block t
    hidden: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (block, layer) -> (B, T, W)
    block_sq: list[torch.Tensor] = field(default_factory=list)  # block_sq[t-1]: (B,) mean square of block t's output
    input_sq: torch.Tensor | None = None  # (B,) mean square of the flow's input (ml-starflow's latent-norm form)


def latent_norm_penalty(out: FlowOutput, form: str = "mean") -> torch.Tensor:
    """STARFlow's latent-norm regulariser on the intermediate block outputs (blocks 1..N-1; block N's output z is
    already held by the prior). form "mean": their mean square averaged over blocks and batch (zero for a one-block
    flow). form "starflow": ml-starflow's sum over the flow's input and those outputs of each one's mean square; the
    input's term has no gradient, so it trains like "mean" with the weight times N-1."""
    inner = out.block_sq[:-1]
    if form == "starflow":
        return torch.stack([out.input_sq, *inner]).mean(dim=1).sum()
    if form != "mean":
        raise ValueError(f"latent-norm form must be mean or starflow, got {form!r}")
    if not inner:
        return out.z.new_zeros(())
    return torch.stack(inner).mean()


class FlowBlock(nn.Module):
    """One autoregressive affine flow: permutation, causal transformer, affine output."""

    def __init__(self, cfg: FlowConfig, layers: int, flip: bool, conditioned: bool):
        super().__init__()
        self.flip = flip
        self.proj_in = nn.Linear(cfg.token_dim, cfg.width)
        if cfg.pos_embed == "learned":
            self.pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.width) * 1e-2)
        elif cfg.pos_embed == "sincos":
            self.register_buffer("pos", sincos_2d(cfg.grid, cfg.width), persistent=False)
        else:
            self.pos = None
            cos, sin = rope_2d(cfg.grid, cfg.head_dim, still_pairs=ROPE_STILL_PAIRS if cfg.rope_layout == "3d" else 0)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.class_embed = (
            nn.Parameter(torch.randn(cfg.num_classes, cfg.width) * 1e-2) if conditioned and cfg.num_classes else None
        )
        self.layers = nn.ModuleList(Layer(cfg.width, cfg.head_dim, cfg.mlp_ratio, cfg.mlp) for _ in range(layers))
        self.proj_out = nn.Linear(cfg.width, 2 * cfg.token_dim)
        nn.init.zeros_(self.proj_out.weight)  # identity map at initialisation
        nn.init.zeros_(self.proj_out.bias)
        self.sos = nn.Parameter(torch.randn(cfg.token_dim)) if cfg.start_token else None
        self.final_norm = nn.RMSNorm(cfg.width, eps=1e-6) if cfg.final_norm else None
        self.cond_token = cfg.cond_token and self.class_embed is not None
        self.scale, self.soft_clip = cfg.scale, cfg.soft_clip
        learned_null = cfg.null_class == "learned" and self.class_embed is not None
        self.null_embed = nn.Parameter(torch.randn(cfg.width) * 1e-2) if learned_null else None
        self.rope_by_sequence = cfg.rope_order == "sequence"

    # -- token order ------------------------------------------------------------------------------------------
    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial token order <-> this block's processing order (an involution)."""
        return x.flip(1) if self.flip else x

    @property
    def prefix(self) -> int:
        """Context positions before the tokens' own (the class token, with cond_token)."""
        return int(self.cond_token)

    # -- conditioning -----------------------------------------------------------------------------------------
    def condition(self, y: torch.Tensor | None, class_weights: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """(B, W) class embedding, or None for an unconditioned block.

        y < 0 (a dropped label) and y=None use the null embedding: the mean class embedding, or a learned one
        (null_class "learned"); class_weights (B, K) mix the class embeddings.
        """
        E = self.class_embed
        if E is None:
            return None
        if class_weights is not None:
            return class_weights.to(E.dtype) @ E
        null = E.mean(dim=0) if self.null_embed is None else self.null_embed
        if y is None:
            return null.expand(batch, -1)
        picked = E[y.clamp(min=0)]
        return torch.where((y >= 0)[:, None], picked, null)

    # -- transformer pieces -----------------------------------------------------------------------------------
    def _spatial(self, table: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Rows of a per-spatial-token table for block-order positions start..start+n-1 (a slice, so a cached
        decoding step does not copy the whole table)."""
        if not self.flip:
            return table[start : start + n]
        T = table.shape[0]
        return table[T - start - n : T - start].flip(0)

    def position(self, start: int, n: int) -> torch.Tensor:
        """Embeddings of block-order positions start..start+n-1, each the embedding of its spatial token."""
        if not self.flip:
            return self.pos[start : start + n]
        T = self.pos.shape[0]
        return self.pos[T - start - n : T - start].flip(0)

    def rotary(self, start: int, n: int, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of `lead` context positions (no rotation) and block-order positions start..start+n-1: each
        position's spatial token's angles, or (rope_order "sequence") raster position i's for block-order i."""
        if self.rope_by_sequence:
            cos, sin = self.rope_cos[start : start + n], self.rope_sin[start : start + n]
        else:
            cos, sin = self._spatial(self.rope_cos, start, n), self._spatial(self.rope_sin, start, n)
        if lead:
            cos = torch.cat([cos.new_ones(lead, cos.shape[1]), cos])
            sin = torch.cat([sin.new_zeros(lead, sin.shape[1]), sin])
        return cos, sin

    def embed(self, u: torch.Tensor, cond: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """u: tokens in block order (B, n, D) starting at position `start` (class embedding added unless it is a
        token of its own)."""
        h = self.proj_in(u)
        if self.pos is not None:
            h = h + self.position(start, u.shape[1])
        if cond is not None and not self.cond_token:
            h = h + cond[:, None, :]
        return h

    def run(self, s: torch.Tensor, start: int, cond: torch.Tensor | None, caches: list[KVCache] | None = None,
            temp: torch.Tensor | None = None, keep: frozenset[int] = frozenset(), stop: int | None = None):
        """The causal transformer on sequence inputs s (B, n, D) at block-order positions start..start+n-1.

        Returns the last hidden state (B, n, W) and {layer: residual stream after it} for the layers in `keep`
        (block order), both without the class-token position. With caches, they hold the positions before
        `start` and take this chunk's keys and values; the class token goes first into empty caches.
        temp (B,): per-row attention temperature.
        """
        h = self.embed(s, cond, start)
        lead = 0
        if self.cond_token and cond is not None and start == 0 and (caches is None or caches[0].length == 0):
            lead = 1
            h = torch.cat([cond[:, None, :].to(h.dtype), h], dim=1)
        rope = None if self.pos is not None else self.rotary(start, s.shape[1], lead)
        hidden = {}
        if h.shape[1] == 0:
            return h, hidden
        for l, layer in enumerate(self.layers, 1):
            if stop is not None and l > stop:
                break
            h = layer(h, None if caches is None else caches[l - 1], rope, temp)
            if l in keep:
                hidden[l] = h[:, lead:] if lead else h
        return (h[:, lead:] if lead else h), hidden

    def sequence(self, u: torch.Tensor) -> torch.Tensor:
        """Transformer inputs of block-order tokens u (B, T, D): u itself, or (start, u_0..u_{T-2})."""
        if self.sos is None:
            return u
        return torch.cat([self.sos.to(u.dtype).expand(u.shape[0], 1, -1), u[:, :-1]], dim=1)

    def transformer(
        self, u: torch.Tensor, cond: torch.Tensor | None, keep: frozenset[int] = frozenset(), stop: int | None = None,
        temp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run layers 1..stop (all by default) on block-order tokens u; return the last hidden state (B, T, W) in
        block order and the residual streams after the layers in `keep` (1-indexed), (B, T, W) each, put back into
        spatial token order. Position i's state is the one that predicts token i+1 (token i with a start token)."""
        h, hidden = self.run(self.sequence(u), 0, cond, temp=temp, keep=keep, stop=stop)
        return h, {l: self.permute(v) for l, v in hidden.items()}

    def affine(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs (a, b) of hidden states: optional final norm, output projection, optional soft clip."""
        if self.final_norm is not None:
            h = self.final_norm(h.float()).to(h.dtype)
        o = self.proj_out(h)
        if self.soft_clip > 0:
            o = self.soft_clip * torch.tanh(o / self.soft_clip)
        a, b = o.chunk(2, dim=-1)
        return a, b

    def affine_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log sigma, mu) from hidden states (unshifted): log sigma = a, or log softplus(a + log(e - 1))."""
        a, b = self.affine(h)
        if self.scale == "softplus":
            a = log_softplus(a.float() + INV_SOFTPLUS_1)
        return a, b

    @staticmethod
    def shift(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(p[:, :1]), p[:, :-1]], dim=1)

    def shifted_affine(self, u: torch.Tensor, cond: torch.Tensor | None, keep: frozenset[int] = frozenset(),
                       temp: torch.Tensor | None = None):
        """(log sigma, mu) of every token of block-order u, each from the tokens before it, computed in parallel
        (teacher forcing), plus kept hiddens. Without a start token, token 0 gets (0, 0): it passes unchanged."""
        h, hidden = self.transformer(u, cond, keep, temp=temp)
        a, b = self.affine_params(h)
        if self.sos is None:
            a, b = self.shift(a), self.shift(b)
        return a, b, hidden

    def token_params(self, u: torch.Tensor, j0: int, j1: int, cond: torch.Tensor | None,
                     caches: list[KVCache] | None = None, temp: torch.Tensor | None = None):
        """(log sigma, mu) of tokens j0..j1-1 of block-order u, in parallel, each from the tokens of u before it.

        Token j is predicted from u_{j-1} (token 0 from the start token; without one it has (0, 0)). With caches,
        they hold the context of the tokens before j0 and take the inputs of this range; without, j0 must be 0.
        """
        if caches is None:
            if j0 != 0:
                raise ValueError("token_params without caches computes a prefix of the tokens (j0 = 0)")
            a, b, _ = self.shifted_affine(u, cond, temp=temp) if j1 == u.shape[1] else \
                self.shifted_affine(u[:, :j1], cond, temp=temp)
            return a, b
        lo = max(j0 - 1, 0)
        s = u[:, lo : j1 - 1]
        start = lo
        if self.sos is not None:
            start = j0
            if j0 == 0:
                s = torch.cat([self.sos.to(u.dtype).expand(u.shape[0], 1, -1), s], dim=1)
        h, _ = self.run(s, start, cond, caches, temp)
        a, b = self.affine_params(h)
        if self.sos is None and j0 == 0:  # token 0 passes unchanged
            z = torch.zeros_like(u[:, :1])
            a, b = torch.cat([z.to(a.dtype), a], dim=1), torch.cat([z.to(b.dtype), b], dim=1)
        return a, b

    # -- the affine rule --------------------------------------------------------------------------------------
    @staticmethod
    def affine_forward(u: torch.Tensor, log_sigma: torch.Tensor, mu: torch.Tensor):
        """v = (u - mu) / sigma and its log|det| per sample, -sum log sigma."""
        v = (u - mu) * torch.exp(-log_sigma.float()).to(u.dtype)
        return v, -log_sigma.float().sum(dim=(1, 2))

    @staticmethod
    def affine_inverse(v: torch.Tensor, log_sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """u = v * sigma + mu, in fp32."""
        return v * torch.exp(log_sigma.float()) + mu.float()

    # -- flow maps --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, keep: frozenset[int] = frozenset()):
        """x (spatial order) -> (v in spatial order, log|det| per sample, kept hiddens)."""
        u = self.permute(x)
        a, b, hidden = self.shifted_affine(u, cond, keep)
        v, logdet = self.affine_forward(u, a, b)
        return self.permute(v), logdet, hidden

    def step(self, u_i: torch.Tensor, i: int, cond: torch.Tensor | None, caches: list[KVCache],
             temp: torch.Tensor | None = None):
        """One cached decoding step: token i (block order, (B,1,D)) in, (log sigma, mu) of token i+1 out.

        Empty caches first take the context (class token, start token) in the same call."""
        start = i + (self.sos is not None)
        if self.sos is not None and caches[0].length == 0:
            u_i = torch.cat([self.sos.to(u_i.dtype).expand(u_i.shape[0], 1, -1), u_i], dim=1)
            start = 0
        h, _ = self.run(u_i, start, cond, caches, temp)
        return self.affine_params(h if h.shape[1] == 1 else h[:, -1:])

    def first(self, u: torch.Tensor, cond: torch.Tensor | None, caches: list[KVCache] | None = None,
              temp: torch.Tensor | None = None):
        """(log sigma, mu) of token 0 ((0, 0) without a start token); with caches, they take the context."""
        return self.token_params(u, 0, 1, cond, caches, temp)

    def step_uncached(self, u_prefix: torch.Tensor, cond: torch.Tensor | None, temp: torch.Tensor | None = None):
        """Reference for `step`: recompute the whole prefix u_0..u_i and read the last position."""
        if self.sos is not None:
            u_prefix = torch.cat([u_prefix, u_prefix[:, :1]], dim=1)  # the appended token is never read
        h, _ = self.transformer(u_prefix, cond, temp=temp)
        return self.affine_params(h[:, -1:])

    def new_caches(self, max_len: int, differentiable: bool = False) -> list[KVCache]:
        """Caches for max_len token positions (plus the class token's)."""
        return [KVCache(max_len + self.prefix, differentiable) for _ in self.layers]


class TARFlow(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.layers)
        flip_parity = 1 if cfg.seq_order == "R2L" else 0
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, depth, flip=t % 2 == flip_parity, conditioned=(cfg.cond_blocks == "all" or t == n - 1))
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
        out = FlowOutput(z=h, logdet=torch.zeros(x.shape[0], device=x.device),
                         input_sq=h.detach().float().pow(2).mean(dim=(1, 2)))
        for t, (blk, cond) in enumerate(zip(self.blocks, conds), start=1):
            if keep_inputs:
                out.block_inputs.append(h)
            h, logdet, hidden = blk(h, cond, frozenset(keep.get(t, ())))
            out.block_sq.append(h.float().pow(2).mean(dim=(1, 2)))
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
        return {"config": self.cfg.to_dict(), "weights": self.state_dict()}  # read back by checkpoints.load_flow


def log_prob_from(out: FlowOutput) -> torch.Tensor:
    z = out.z.float()
    d = z[0].numel()
    return -0.5 * z.pow(2).sum(dim=(1, 2)) - 0.5 * d * LOG_2PI + out.logdet


def bits_per_dim(nll_per_dim: torch.Tensor | float, data_range_bins: int = 256) -> torch.Tensor | float:
    """Discrete bits/dim of 8-bit data scaled to [-1, 1]: a bin is 2/256 wide, so add log(128) nats."""
    return (nll_per_dim + math.log(data_range_bins / 2)) / math.log(2)
