"""The frozen vision encoder that alignment targets come from: any timm ViT (DINOv2 ViT-B/14 in the paper).

An encoder lives in a directory: `config.json` (timm architecture, its keyword arguments, input size, normalisation)
and `model.safetensors`. Loading always goes through `timm.create_model(..., pretrained=True)` with the local file
as the pretrained source, so the same code loads a hub DINOv2 saved by `flowback weights fetch` and the small ViT
the default profile trains on its own data. Without the local file it tries the hub; if that fails too, the error
names the directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..frozen import Frozen
from ..io import FlowBackFileError, save_network

if TYPE_CHECKING:
    from ..params.schema import EncoderParams

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class EncoderConfig:
    arch: str  # timm name, e.g. vit_base_patch14_dinov2.lvd142m
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model keyword arguments (img_size, ...)
    input_size: int = 224  # images are resized to this square size
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    @classmethod
    def of(cls, e: "EncoderParams") -> "EncoderConfig":
        """From the params' encoder: section (what the encoder stage trains, or the hub weights describe)."""
        return cls(arch=e.arch, kwargs=dict(e.kwargs), input_size=e.input_size, mean=tuple(e.mean), std=tuple(e.std))


class FrozenEncoder(Frozen):
    """Images in [-1, 1] (B, C, H, W) -> patch features (B, gh, gw, E); no gradients, eval mode."""

    def __init__(self, net: nn.Module, cfg: EncoderConfig):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.in_chans = int(getattr(net.patch_embed.proj, "in_channels", len(cfg.mean)))
        self.dim = int(net.num_features)
        patch = getattr(net.patch_embed, "patch_size", (1, 1))
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.freeze()

    def resize_input(self, size: int) -> "FrozenEncoder":
        """Read images at `size` px (target_grid dino448: DINOv2 at 448 px has the 32 x 32 grid of a 256 px flow);
        timm interpolates the position embeddings."""
        if size != self.cfg.input_size:
            if not hasattr(self.net, "set_input_size"):
                raise ValueError(f"encoder {self.cfg.arch} cannot change its input size to {size}")
            self.net.set_input_size(img_size=size)
            self.cfg = replace(self.cfg, input_size=size)
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return preprocess(x, self.cfg, self.in_chans)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(self.preprocess(x))
        tokens = tokens[:, getattr(self.net, "num_prefix_tokens", 0):]
        B, n, E = tokens.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"encoder {self.cfg.arch} returned {n} patch tokens, not a square grid")
        return tokens.reshape(B, g, g, E)


def preprocess(x: torch.Tensor, cfg: EncoderConfig, in_chans: int) -> torch.Tensor:
    """[-1, 1] images -> the encoder's input: [0, 1], channels matched, resized to input_size, normalised."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] != in_chans:
        if x.shape[1] != 1:
            raise ValueError(f"encoder {cfg.arch} takes {in_chans} channels, images have {x.shape[1]}")
        x = x.expand(-1, in_chans, -1, -1)
    size = cfg.input_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode=cfg.interpolation, align_corners=False,
                          antialias=size < x.shape[-1])
    mean = torch.tensor(cfg.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def create_timm(cfg: EncoderConfig, weights: Path | None) -> nn.Module:
    import timm

    # custom_load=False: some timm configs expect their own .npz format; ours is a plain safetensors state dict
    overlay = None
    if weights is not None:
        in_chans = cfg.kwargs.get("in_chans", 3)
        overlay = {"file": str(weights), "custom_load": False, "input_size": (in_chans, cfg.input_size, cfg.input_size)}
    return timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay=overlay, **cfg.kwargs)


def save_encoder(net: nn.Module, cfg: EncoderConfig, directory: str | Path) -> None:
    save_network(directory, net.state_dict(), asdict(cfg), WEIGHTS_FILE)


def read_config(directory: str | Path) -> EncoderConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FlowBackFileError(f"{path}: encoder config not found")
    try:
        d = json.loads(path.read_text())
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return EncoderConfig(**d)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise FlowBackFileError(f"{path}: not a valid encoder config ({e})") from e


def load_encoder(directory: str | Path, fallback: EncoderConfig | None = None, allow_hub: bool = True) -> FrozenEncoder:
    """Load from `directory` if it holds weights; else download `fallback.arch` from the hub (when allowed)."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if weights.exists():
        cfg = read_config(directory) if (directory / CONFIG_FILE).exists() else fallback
        if cfg is None:
            raise FlowBackFileError(f"{directory}: has {WEIGHTS_FILE} but no {CONFIG_FILE} describing it")
        try:
            return FrozenEncoder(create_timm(cfg, weights), cfg)
        except Exception as e:
            raise FlowBackFileError(f"{weights}: cannot load as timm {cfg.arch!r} ({type(e).__name__}: {e})") from e
    if fallback is None or not allow_hub:
        raise FlowBackFileError(
            f"{directory}: no encoder weights ({WEIGHTS_FILE}) and the hub is not allowed here; "
            f"run `flowback weights fetch` where there is internet and copy the directory"
        )
    try:
        return FrozenEncoder(create_timm(fallback, None), fallback)
    except Exception as e:
        raise FlowBackFileError(
            f"{directory}: no encoder weights ({WEIGHTS_FILE}), and downloading {fallback.arch!r} from the hub failed "
            f"({type(e).__name__}: {e}); run `flowback weights fetch` where there is internet and copy the directory"
        ) from e
