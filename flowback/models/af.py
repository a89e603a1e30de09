"""Adversarial flow models (Lin, Yang, Lin, Chen, Fan, arXiv 2511.22475): the networks and the sampler.

An AF generator maps a point of the flow-matching path x_s = (1 - s) x + s z to a point x_t further along it
(s > t; s = 1 is pure noise z, t = 0 is data) in one network evaluation. A 1-NFE model has s = 1, t = 0 fixed and no
time input; a multi-step model is the same generator applied on the grid 1 > 1 - 1/N > ... > 0, with s (and, for an
any-step model, t) as inputs. Training (af_objective.py) is adversarial plus an optimal-transport term that pins the
generator to the deterministic flow-matching (W2) map, so sampling is a pure function of (z, y).

All three networks are DiTs (Peebles & Xie): patch tokens with fixed 2-D sin-cos positions, non-causal transformer
blocks with adaLN-Zero conditioning (the modulation and the output layer start at zero, so every residual block is
the identity at initialisation). The attention and MLP are transformer.py's, with their own pre-LayerNorm replaced
by adaLN's modulated, affine-free LayerNorm; patchify and the position table are TARFlow's.
- Generator: conditioned on the class (+ source time s for multi-step, + target time t for any-step). Depth
  repetition runs the same blocks `repeat` times in one pass, each pass told which one it is by the time embedding
  of 1 - r / repeat (as the reference code does); the output layer sees the class alone.
- Discriminator: the same trunk with one extra learned read-out token in front; conditioned on the class (+ t for
  multi-step: it judges x_t at its time, never the source sample); logit = Linear(LayerNorm(read-out token)).
- FlowClassifier: the same trunk and read-out, conditioned on the time only; C(x_t, t) classifies a noised sample
  x_t = (1 - t) x + t eps. Flow-based classifier guidance (af_objective.guidance_loss) needs it, trained beforehand
  on real data (af_training.train_flow_classifier).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .tarflow import TARFlow, sincos_2d
from .transformer import MLP, Attention

TIME_FREQS = 256  # DiT's sinusoidal time features
TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, the scale DiT's embedding was designed for


@dataclass(frozen=True)
class AFConfig:
    channels: int
    image_size: int
    patch_size: int
    width: int
    depth: int
    head_dim: int = 64
    mlp_ratio: int = 4
    num_classes: int = 0
    disc_width: int | None = None  # None: the generator's (the paper's G and D have one size)
    disc_depth: int | None = None
    nfe: int = 1  # network evaluations per sample the generator is trained for; 1 = no time input
    any_step: bool = False  # s ~ U(0, 1), t ~ U(0, s) in training; the target time is an input too
    pred: str = "x"  # x: the network outputs x_t; v: x_t = x_s - (s - t) * output
    repeat: int = 1  # depth repetition: the blocks run `repeat` times in one NFE

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("width", "depth", "nfe", "repeat", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pred not in ("x", "v"):
            raise ValueError(f"pred must be 'x' or 'v', got {self.pred!r}")
        if self.repeat > 1 and self.time_input:
            raise ValueError("depth repetition (repeat > 1) is a 1-NFE option: use nfe=1 and any_step=false")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def time_input(self) -> bool:
        return self.nfe > 1 or self.any_step

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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AFConfig":
        return cls(**d)


# -------------------------------------------------------------------------------------------------- layout
def patchify(cfg: AFConfig, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C*p*p) in row-major token order: TARFlow's layout (its method, reused as is)."""
    return TARFlow.patchify(SimpleNamespace(cfg=cfg), x)


def unpatchify(cfg: AFConfig, x: torch.Tensor) -> torch.Tensor:
    return TARFlow.unpatchify(SimpleNamespace(cfg=cfg), x)


# ----------------------------------------------------------------------------------------------- conditioning
def time_features(t: torch.Tensor, dim: int = TIME_FREQS, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal features of t * 1000: (B,) -> (B, dim), [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = (t.float() * TIME_SCALE)[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


class TimeEmbed(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQS, width), nn.SiLU(), nn.Linear(width, width))
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(time_features(t).to(self.mlp[0].weight.dtype))  # float32 features; a float64 copy works too


class ClassEmbed(nn.Module):
    """One learned vector per class; an unconditional model (num_classes = 0) has a single one."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(max(num_classes, 1), width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        if self.num_classes == 0 or y is None:
            if self.num_classes and y is None:
                raise ValueError("a class-conditional AF network needs labels y")
            return self.table.weight[:1].expand(batch, -1)
        return self.table(y)


def as_times(t: torch.Tensor | float | None, batch: int, device: torch.device) -> torch.Tensor | None:
    if t is None or isinstance(t, torch.Tensor) and t.dim() == 1:
        return t
    return torch.full((batch,), float(t), device=device)


def to_target(cfg: AFConfig, x_s: torch.Tensor, out: torch.Tensor, s, t) -> torch.Tensor:
    """The generator's raw output -> its estimate of x_t: x_t = out (pred x) or x_s - (s - t) out (pred v).
    Kept outside `Generator.forward` so a DistributedDataParallel wrapper's forward is the only call training makes."""
    if cfg.pred == "x":
        return out
    B = len(x_s)
    return x_s - (as_times(s, B, x_s.device) - as_times(t, B, x_s.device)).view(-1, 1, 1, 1) * out


# ----------------------------------------------------------------------------------------------------- trunk
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """x + g1 * attn(LN(x) * (1 + a1) + b1), then x + g2 * mlp(LN(x) * (1 + a2) + b2); (b, a, g) from the
    condition, zero at initialisation (adaLN-Zero), so the block starts as the identity."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, head_dim, causal=False)
        self.attn.norm = nn.Identity()  # adaLN normalises and modulates before attention
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio)
        self.mlp.norm = nn.Identity()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b1, a1, g1, b2, a2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), b1, a1))
        return x + g2 * self.mlp(modulate(self.norm2(x), b2, a2))


class DiT(nn.Module):
    """Patch embedding, fixed sin-cos positions, optional read-out token in front, adaLN-Zero blocks."""

    def __init__(self, cfg: AFConfig, width: int, depth: int, readout: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.token_dim, width)
        self.register_buffer("pos", sincos_2d(cfg.grid, width), persistent=False)
        self.readout = nn.Parameter(torch.randn(width) * 0.02) if readout else None
        self.blocks = nn.ModuleList(AdaLNBlock(width, cfg.head_dim, cfg.mlp_ratio) for _ in range(depth))
        # DiT's initialisation: xavier-uniform linear weights, zero biases, then adaLN modulation at zero
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(patchify(self.cfg, x)) + self.pos
        if self.readout is not None:
            h = torch.cat([self.readout.expand(len(h), 1, -1), h], dim=1)
        return h

    def run(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            h = blk(h, c)
        return h


class FinalLayer(nn.Module):
    """LN(h) * (1 + a) + b with (b, a) from the condition, then a linear map to patch values; all zero at start."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for lin in (self.ada[1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, a = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), b, a))


class ReadoutHead(nn.Module):
    """Affine-free LayerNorm of the read-out token, then a linear map (the discriminator's and classifier's head)."""

    def __init__(self, width: int, out_dim: int, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(h[:, 0]))


# -------------------------------------------------------------------------------------------------- networks
class Generator(nn.Module):
    def __init__(self, cfg: AFConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = DiT(cfg, cfg.width, cfg.depth)
        self.class_embed = ClassEmbed(cfg.num_classes, cfg.width)
        # the source-time embedding doubles as the repetition embedding of a depth-repeated 1-NFE model
        self.time_embed = TimeEmbed(cfg.width) if cfg.time_input or cfg.repeat > 1 else None
        self.target_embed = TimeEmbed(cfg.width) if cfg.any_step else None
        self.final = FinalLayer(cfg.width, cfg.token_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, s=None, t=None) -> torch.Tensor:
        """The raw network output (B, C, H, W): x_t itself (pred x) or the velocity g (pred v)."""
        B = len(x)
        c = self.class_embed(y, B)
        if self.cfg.time_input:
            if s is None or (self.cfg.any_step and t is None):
                raise ValueError("a multi-step AF generator needs the source time s (and t when any_step)")
            c = c + self.time_embed(as_times(s, B, x.device))
            if self.target_embed is not None:
                c = c + self.target_embed(as_times(t, B, x.device))
        h = self.trunk.tokens(x)
        R = self.cfg.repeat
        if R == 1:
            h = self.trunk.run(h, c)
        else:
            for r in range(R):
                h = self.trunk.run(h, c + self.time_embed(as_times(1.0 - r / R, B, x.device)))
        return unpatchify(self.cfg, self.final(h, c))

    def transport(self, x: torch.Tensor, y: torch.Tensor | None, s=1.0, t=0.0) -> torch.Tensor:
        """One NFE: the estimate of x_t from x_s (s > t)."""
        return to_target(self.cfg, x, self(x, y, s, t), s, t)

    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "weights": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Generator":
        model = cls(AFConfig.from_dict(state["config"]))
        model.load_state_dict(state["weights"])
        return model


class Discriminator(nn.Module):
    def __init__(self, cfg: AFConfig):
        super().__init__()
        self.cfg = cfg
        width, depth = cfg.disc_width or cfg.width, cfg.disc_depth or cfg.depth
        self.trunk = DiT(cfg, width, depth, readout=True)
        self.class_embed = ClassEmbed(cfg.num_classes, width)
        self.time_embed = TimeEmbed(width) if cfg.time_input else None
        self.head = ReadoutHead(width, 1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None, t=None) -> torch.Tensor:
        """Logits (B,) of x being real, given its class (and its time t on a multi-step path)."""
        c = self.class_embed(y, len(x))
        if self.time_embed is not None:
            c = c + self.time_embed(as_times(t, len(x), x.device))
        return self.head(self.trunk.run(self.trunk.tokens(x), c)).view(-1)


class FlowClassifier(nn.Module):
    """C(x_t, t) -> class logits, for x_t on the flow path (1 - t) x + t eps; its own width/depth."""

    def __init__(self, cfg: AFConfig, width: int | None = None, depth: int | None = None):
        super().__init__()
        if cfg.num_classes < 1:
            raise ValueError("a flow classifier needs num_classes >= 1")
        self.cfg = cfg
        self.width, self.depth = width or cfg.width, depth or cfg.depth
        self.trunk = DiT(cfg, self.width, self.depth, readout=True)
        self.time_embed = TimeEmbed(self.width)
        self.head = ReadoutHead(self.width, cfg.num_classes, bias=True)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        c = self.time_embed(as_times(t, len(x), x.device))
        return self.head(self.trunk.run(self.trunk.tokens(x), c))

    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "width": self.width, "depth": self.depth, "weights": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "FlowClassifier":
        model = cls(AFConfig.from_dict(state["config"]), state["width"], state["depth"])
        model.load_state_dict(state["weights"])
        return model


# -------------------------------------------------------------------------------------------------- sampling
def time_grid(nfe: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """1 = s_0 > s_1 > ... > s_N = 0, evenly spaced: the grid a fixed N-step model is trained on."""
    return torch.linspace(1.0, 0.0, nfe + 1, device=device)


@torch.no_grad()
def sample_af(
    generator: Generator,
    y: torch.Tensor | None,
    rng: torch.Generator | None = None,
    z: torch.Tensor | None = None,
    nfe: int | None = None,
    batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Samples in model space (B, C, H, W): z ~ N(0, I) (drawn from `rng`, or given), then `nfe` transports
    along the time grid (default: the generator's own NFE). Deterministic given z: no noise is injected.
    Classifier guidance is not a sampling-time option: the paper trains it into the generator."""
    cfg = generator.cfg
    nfe = cfg.nfe if nfe is None else int(nfe)
    if nfe < 1 or (nfe != cfg.nfe and not cfg.any_step):
        raise ValueError(f"this generator was trained for {cfg.nfe} step(s); sampling with {nfe} needs an "
                         f"any-step model (any_step: true)")
    device = next(generator.parameters()).device
    if z is None:
        n = len(y) if y is not None else batch
        if n is None:
            raise ValueError("sample_af needs labels y, a noise tensor z or a batch size")
        z = torch.randn((n, *cfg.image_shape), generator=rng, device=device)
    x = z.to(device)
    ts = time_grid(nfe)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32) else nullcontext()
    with ctx:
        for s, t in zip(ts[:-1].tolist(), ts[1:].tolist()):
            x = generator.transport(x, y, s, t).float()
    return x

