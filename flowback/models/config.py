"""A flow's architecture as plain data, and the one place its settings are checked: the model builds from it, and
params validation builds one too (so a bad combination is a params error naming it, found before any work). No torch
here, so validating params stays cheap."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .choices import COND_BLOCKS, MLPS, NULL_CLASSES, POS_EMBEDS, ROPE_LAYOUTS, ROPE_ORDERS, SCALES, SEQ_ORDERS

VAE_DOWNSAMPLE = 8  # stable-diffusion VAEs: 256 px -> 32 x 32 x 4 latents
VAE_CHANNELS = 4
# STARFlow options and their off values; a config leaves them out of to_dict() when off, so TARFlow checkpoints
# stay byte-identical to those written before the options existed
STARFLOW_DEFAULTS = {"start_token": False, "final_norm": False, "scale": "exp", "soft_clip": 0.0, "cond_token": False,
                     "mlp": "gelu", "seq_order": "R2L", "rope_layout": "2d", "rope_order": "spatial",
                     "null_class": "mean"}
ROPE_STILL_PAIRS = 8  # ml-starflow's rotary pairs for its third (text/class) axis, rope_layout "3d"


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
    pos_embed: str = "learned"  # learned | sincos | rope
    cond_blocks: str = "all"  # all | deep
    start_token: bool = False
    final_norm: bool = False
    scale: str = "exp"  # exp | softplus
    soft_clip: float = 0.0  # 0 = off
    cond_token: bool = False
    mlp: str = "gelu"  # gelu | swiglu | geglu
    seq_order: str = "R2L"  # R2L: blocks 2, 4, ... flip (TARFlow) | L2R: blocks 1, 3, ... flip
    rope_layout: str = "2d"  # 2d | 3d (ml-starflow's with a class/text token)
    rope_order: str = "spatial"  # spatial | sequence (ml-starflow)
    null_class: str = "mean"  # mean | learned

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "soft_clip", float(self.soft_clip))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        choices = {"pos_embed": POS_EMBEDS, "cond_blocks": COND_BLOCKS, "scale": SCALES, "mlp": MLPS,
                   "seq_order": SEQ_ORDERS, "rope_layout": ROPE_LAYOUTS, "rope_order": ROPE_ORDERS,
                   "null_class": NULL_CLASSES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
        if self.pos_embed == "rope" and self.head_dim % 4:
            raise ValueError(f"pos_embed 'rope' needs head_dim divisible by 4, got {self.head_dim}")
        if self.soft_clip < 0:
            raise ValueError(f"soft_clip must be >= 0 (0 = off), got {self.soft_clip}")
        if self.pos_embed != "rope" and (self.rope_layout, self.rope_order) != ("2d", "spatial"):
            raise ValueError("rope_layout and rope_order need pos_embed 'rope'")
        if self.rope_layout == "3d" and not (self.head_dim % 4 == 0 and self.head_dim > 2 * ROPE_STILL_PAIRS):
            raise ValueError(f"rope_layout '3d' needs head_dim divisible by 4 and above {2 * ROPE_STILL_PAIRS}, got "
                             f"{self.head_dim}")

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
        for k, off in STARFLOW_DEFAULTS.items():
            if d[k] == off:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlowConfig":
        return cls(**d)
