"""The frozen VAE of latent mode (ImageNet 256 in the paper): a thin wrapper over diffusers' `AutoencoderKL`.

The flow models scaled VAE latents (Stable Diffusion's VAE: 256 px -> 4 x 32 x 32) instead of pixels; samples are
denoised in latent space and only then decoded. A VAE lives in a diffusers-format directory (`config.json` +
`diffusion_pytorch_model.safetensors`) and is loaded from it with the hub switched off (unless `allow_hub`), so a
missing download is a clear error naming the directory, never a silent fetch. diffusers is imported lazily: pixel
mode never pays for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..frozen import Frozen
from ..io import FlowBackFileError, sha256_file
from .config import VAE_CHANNELS, VAE_DOWNSAMPLE

HUB_VAE = "stabilityai/sd-vae-ft-ema"  # the paper's VAE; `flowback weights fetch` saves it locally
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_FETCH_HINT = (f"put a diffusers AutoencoderKL there ({CONFIG_FILE} + {WEIGHTS_FILE}), e.g. {HUB_VAE} saved by "
               f"`flowback weights fetch` on a machine with internet")


def _autoencoder_kl():
    from diffusers import AutoencoderKL  # ~6 s to import: only latent mode pays it

    return AutoencoderKL


# safetensors only (never a pickled .bin); the loading report is checked, because diffusers merely logs a warning
# and keeps random weights for keys missing from the file; the VAE is small, so accelerate's meta loading is not needed
_LOAD_ARGS = dict(use_safetensors=True, output_loading_info=True, low_cpu_mem_usage=False)


def _checked(loaded) -> nn.Module:
    vae, info = loaded
    bad = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    bad = {k: sorted(map(str, v))[:5] for k, v in bad.items() if v}
    if bad:
        raise ValueError(f"weights do not match the config: {bad}")
    return vae


def load_pretrained_vae(source: str | Path) -> nn.Module:
    """`AutoencoderKL.from_pretrained(source)` (a hub repo or a diffusers directory), safetensors only, with every
    weight checked against the config (diffusers would only log a warning and keep random weights)."""
    return _checked(_autoencoder_kl().from_pretrained(source, **_LOAD_ARGS))


def load_vae(directory: str | Path, device: str | torch.device = "cpu", allow_hub: bool = False) -> nn.Module:
    """A frozen `AutoencoderKL` from a local diffusers directory; with `allow_hub`, the paper's VAE when it is empty."""
    directory = Path(directory)
    AutoencoderKL = _autoencoder_kl()
    if not (directory / CONFIG_FILE).exists():
        if not allow_hub:
            raise FlowBackFileError(f"{directory}: no VAE here (no {CONFIG_FILE}); {_FETCH_HINT}")
        try:
            vae = load_pretrained_vae(HUB_VAE)
        except Exception as e:
            raise FlowBackFileError(f"{directory}: no VAE here, and loading {HUB_VAE} from the hub failed "
                                    f"({type(e).__name__}: {e}); {_FETCH_HINT}") from e
        return vae.to(device).eval().requires_grad_(False)
    try:
        kind = json.loads((directory / CONFIG_FILE).read_text()).get("_class_name", "AutoencoderKL")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise FlowBackFileError(f"{directory / CONFIG_FILE}: not a valid diffusers config ({e}); {_FETCH_HINT}") from e
    if kind != "AutoencoderKL":
        raise FlowBackFileError(f"{directory}: holds a diffusers {kind!r}, not an AutoencoderKL; {_FETCH_HINT}")
    if not (directory / WEIGHTS_FILE).exists():
        raise FlowBackFileError(f"{directory}: has {CONFIG_FILE} but no {WEIGHTS_FILE}; {_FETCH_HINT}")
    try:
        vae = _checked(AutoencoderKL.from_pretrained(directory, local_files_only=True, **_LOAD_ARGS))  # no hub
    except Exception as e:  # diffusers raises OSError, ValueError, TypeError... depending on what is wrong
        raise FlowBackFileError(f"{directory}: cannot load as a diffusers AutoencoderKL "
                                f"({type(e).__name__}: {e}); {_FETCH_HINT}") from e
    return vae.to(device).eval().requires_grad_(False)


def vae_fingerprint(directory: str | Path) -> str:
    """sha256 of the config and weights that load_vae reads: sample chunks decoded by another VAE are not reused."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(sha256_file(Path(directory) / name).encode())
    return h.hexdigest()


class LatentCodec(Frozen):
    """Images in [-1, 1] <-> scaled latents, frozen, without gradients, in batches of `batch_size`.

    `encode` returns the posterior mean times `scale`, not a sample: the flow already adds its own training noise
    (model.noise_std), and a deterministic encoding makes a data set's latents cacheable and reproducible.
    `encode_with_std` also returns the posterior std (times `scale`) for callers that want to sample.
    """

    def __init__(self, vae: nn.Module, scale: float = 0.18215, batch_size: int = 32):
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.batch_size = int(batch_size)
        self.freeze()

    @property
    def factor(self) -> int:
        """Spatial downsampling: one per encoder block but the last (8 for SD VAEs' 4 blocks)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode_with_std(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._param()
        means, stds = [], []
        for chunk in images.split(self.batch_size):
            dist = self.vae.encode(chunk.to(p.device, p.dtype)).latent_dist
            means.append(dist.mean.float() * self.scale)
            stds.append(dist.std.float() * self.scale)
        return torch.cat(means), torch.cat(stds)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_with_std(images)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = self._param()
        out = [self.vae.decode(chunk.to(p.device, p.dtype) / self.scale).sample.float().clamp(-1, 1)
               for chunk in latents.split(self.batch_size)]
        return torch.cat(out)


def save_random_vae(directory: str | Path, seed: int = 0, **config) -> Path:
    """Save a tiny randomly initialised AutoencoderKL in diffusers format. For tests: no real VAE can be downloaded.

    The defaults give 2 blocks (downsampling factor 2) and 4 latent channels; a longer block_out_channels gives a
    larger factor (the block types follow its length). Written with `save_vae`.
    """
    n = len(config.get("block_out_channels", (8, 16)))
    cfg = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * n,
               up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=4, norm_num_groups=8,
               sample_size=32)
    cfg.update(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _autoencoder_kl()(**cfg)
    save_vae(vae, directory)
    return Path(directory)


def save_vae(vae: nn.Module, directory: str | Path) -> list[str]:
    """Save in diffusers format (safetensors) through a temporary directory beside `directory`; returns the file
    names. Files are moved in weights first, config last, so a reader never sees a config without its weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        files = sorted(Path(tmp).iterdir(), key=lambda f: (f.name == CONFIG_FILE, f.name))
        for f in files:
            os.replace(f, directory / f.name)
    return [f.name for f in files]


# Stable Diffusion's VAE (sd-vae-ft-ema), for planning memory before its weights are fetched
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, sample_size=256)


def vae_from_config(directory: str | Path) -> nn.Module:
    """An AutoencoderKL of the architecture in `directory`'s config.json (Stable Diffusion's if there is none), with
    random weights: what the memory plan measures on (usually under fake tensors)."""
    path = Path(directory) / CONFIG_FILE
    cfg = dict(SD_VAE_CONFIG)
    if path.exists():
        AutoencoderKL = _autoencoder_kl()
        cfg = AutoencoderKL.load_config(str(path.parent))
        return AutoencoderKL.from_config(cfg).eval().requires_grad_(False)
    return _autoencoder_kl()(**cfg).eval().requires_grad_(False)


def latent_decoder(vae_dir: str | Path, scale: float, device, channels: int, size: int, image_size: int):
    """(decode: latents -> [-1, 1] pixels, a key naming the VAE) of the VAE in `vae_dir`; its grid must match the
    model's latents (`channels` x `size` x `size`, decoded to `image_size` pixels)."""
    codec = LatentCodec(load_vae(vae_dir, device), scale)
    if codec.latent_channels != channels or size * codec.factor != image_size:
        raise FlowBackFileError(
            f"{vae_dir}: this VAE decodes {codec.latent_channels}-channel latents, upsampling by {codec.factor}, but "
            f"params give latents {channels} x {size} x {size} for data.image_size {image_size} (latent mode assumes a "
            f"Stable-Diffusion VAE: {VAE_CHANNELS} channels, factor {VAE_DOWNSAMPLE}, data.image_size a multiple of "
            f"{VAE_DOWNSAMPLE})")
    return codec.decode, f"vae={vae_fingerprint(vae_dir)}:scale={scale}"
