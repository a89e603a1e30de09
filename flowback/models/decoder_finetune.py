"""STARFlow's alternative to score denoising: fine-tune the VAE decoder to map NOISY latents to clean images.

A latent flow trained with Gaussian noise (model.noise_std) samples latents that still carry that noise. Instead of
one score step on the latents, STARFlow fine-tunes the decoder on (z + sigma * eps, x) pairs, so samples are decoded
as they come. Only `post_quant_conv` and `decoder` train (the parts STARFlow's run updates: it encodes without
gradients), so the encoder, and every latent cached with it, stay valid. The loss is STARFlow's (apple/ml-starflow,
misc/ae_losses.py; values and sources in docs/decoder-finetune.md):

    L_G = w_mse * MSE(x01, x01_hat) + w_lpips * LPIPS_vgg(x, x_hat) + w_convnext * MSE(ConvNeXt-S logits)
          + w_gan * (-mean D(x_hat))
    L_D = hinge(D(x), D(x_hat)) + w_lecam * LeCam(D, EMA of the logits)

MSE is taken on [0, 1] images as in STARFlow (so its weights carry over); LPIPS comes from the `lpips` package (the
metric authors' reference implementation) and ConvNeXt-S from torchvision. Their ImageNet trunks are read from local
files (torchvision's download names, by default in torch.hub's checkpoint folder), never downloaded: a missing or
damaged file is a one-line error naming it. `random_weights=True` builds random trunks instead (tests, offline).

Deterministic and resumable like flow training: the noise of step s is drawn from a generator seeded by (seed, s), the
learning rate is a function of s, and `state_dict()` holds only tensors and plain values (weights_only loading).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FlowBackError
from ..frozen import Frozen
from ..io import FlowBackFileError, sha256_file
from ..schedule import learning_rate
from ..seeding import generator

TRAINED_PARTS = ("post_quant_conv.", "decoder.")  # what STARFlow's fine-tuning updates; the encoder side stays
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _weights_file(weights) -> str:
    """torchvision's file name for a weights enum, e.g. vgg16-397923af.pth (the part after '-' prefixes its sha256)."""
    return weights.url.rsplit("/", 1)[-1]


def _trunk_weights(lpips: bool, convnext: bool) -> list:
    """The torchvision weight enums of the perceptual networks asked for."""
    from torchvision.models import ConvNeXt_Small_Weights, VGG16_Weights

    return [w for w, on in ((VGG16_Weights.IMAGENET1K_V1, lpips), (ConvNeXt_Small_Weights.IMAGENET1K_V1, convnext))
            if on]


def default_weights_dir() -> Path:
    """Where torchvision itself caches ImageNet weights (torch.hub's checkpoints), so one fetch serves both."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_perceptual_weights(weights_dir: str | Path | None = None, lpips: bool = True,
                             convnext: bool = True) -> list[Path]:
    """Download the trunk files the loss needs (needs internet; files already there are kept). For weights fetch."""
    directory = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for w in _trunk_weights(lpips, convnext):
        path = directory / _weights_file(w)
        if not path.exists():
            torch.hub.download_url_to_file(w.url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1])
        paths.append(path)
    return paths


def _load_local(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision weights file, checked against the sha256 prefix in its name (torch.hub's own convention)."""
    if not path.exists():
        raise FlowBackFileError(f"{path}: perceptual-loss weights missing; fetch them on a machine with internet "
                                f"(flowback.models.decoder_finetune.fetch_perceptual_weights) and copy them here")
    prefix = path.stem.rsplit("-", 1)[-1]
    if not sha256_file(path).startswith(prefix):
        raise FlowBackFileError(f"{path}: sha256 does not start with {prefix!r}: damaged or not torchvision's file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types depending on the damage
        raise FlowBackFileError(f"{path}: cannot load ({type(e).__name__}: {e})") from e


def load_vgg_trunk(lpips_net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy torchvision VGG16 `features.<i>.*` weights into lpips' trunk, which keeps layer i as `slice<k>.<i>`."""
    own = lpips_net.state_dict()
    mapped = {name: state[f"features.{name.split('.', 1)[1]}"] for name in own
              if f"features.{name.split('.', 1)[1]}" in state}
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(f"VGG16 weights lack {len(missing)} trunk tensors, e.g. {missing[:3]}")
    lpips_net.load_state_dict(mapped, strict=True)


class PerceptualLoss(Frozen):
    """STARFlow's perceptual terms, frozen: LPIPS-VGG and the MSE of ConvNeXt-S logits ("lpips-convnext_s").

    `forward(x, target)` takes images in [-1, 1] and returns the unweighted batch means {"lpips", "convnext"} of
    the networks asked for (the weights live in DecoderFinetuneConfig).
    """

    def __init__(self, lpips: bool = True, convnext: bool = True, weights_dir: str | Path | None = None,
                 random_weights: bool = False):
        super().__init__()
        import lpips as lpips_package
        from torchvision.models import ConvNeXt_Small_Weights, VGG16_Weights, convnext_small

        weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        self.lpips = self.convnext = None
        # random trunks are drawn from a fixed seed, without touching the caller's random stream
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            warnings.simplefilter("ignore", UserWarning)  # lpips 0.1.4 calls torchvision's deprecated `pretrained=`
            if lpips:
                # pretrained=True: the calibrated linear heads shipped inside the lpips package (a local file);
                # pnet_rand=True: the VGG trunk is not downloaded, it is loaded below from weights_dir
                self.lpips = lpips_package.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
                if not random_weights:
                    path = weights_dir / _weights_file(VGG16_Weights.IMAGENET1K_V1)
                    load_vgg_trunk(self.lpips.net, _load_local(path))
            if convnext:
                self.convnext = convnext_small(weights=None)
                if not random_weights:
                    path = weights_dir / _weights_file(ConvNeXt_Small_Weights.IMAGENET1K_V1)
                    self.convnext.load_state_dict(_load_local(path), strict=True)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()  # lpips' dropout must stay off

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self.lpips is not None:
            out["lpips"] = self.lpips(x, target).mean()  # lpips takes [-1, 1]
        if self.convnext is not None:
            def logits(im):  # STARFlow: [0, 1], 224 px (bilinear, antialiased), ImageNet-normalised
                im = F.interpolate((im + 1) / 2, size=224, mode="bilinear", align_corners=False, antialias=True)
                return self.convnext((im - self.mean) / self.std)
            out["convnext"] = F.mse_loss(logits(x), logits(target))
        return out


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one real/fake logit per receptive-field patch, GroupNorm, LeakyReLU.

    Hand-written (no maintained library ships one). STARFlow uses a discriminator of the same family (strided
    stages of width 128 doubling per stage); this one keeps the plain pix2pix layout.
    """

    def __init__(self, channels: int = 3, width: int = 128, stages: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, stages):
            out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(c, out, 4, 2, 1), nn.GroupNorm(math.gcd(32, out), out), nn.LeakyReLU(0.2)]
            c = out
        layers += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(math.gcd(32, c), c), nn.LeakyReLU(0.2),
                   nn.Conv2d(c, 1, 3, 1, 1)]  # 3x3 heads (pix2pix uses 4x4): the logit map keeps its size
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class DecoderFinetuneConfig:
    """Everything that shapes a fine-tuning run (stored in its state, so a resume with other settings is refused)."""

    steps: int
    noise_std: float = 0.3  # the flow's training noise (model.noise_std); STARFlow's config uses 0.3
    scale: float = 0.18215  # model.latent.scale: latents are scaled posterior means
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    mse_weight: float = 1.0
    lpips_weight: float = 1.0
    convnext_weight: float = 0.1
    gan_weight: float = 0.1  # 0 disables the discriminator
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    disc_width: int = 128
    disc_stages: int = 3
    seed: int = 0


def trainable_names(vae: nn.Module) -> list[str]:
    return [n for n, _ in vae.named_parameters() if n.startswith(TRAINED_PARTS)]


class DecoderFinetuner:
    """One fine-tuning run: `step(latents, images)` per batch, `state_dict()`/`load_state_dict()` to resume.

    `vae` is a diffusers AutoencoderKL (e.g. from load_vae), changed in place; `latents` are the scaled posterior
    means (as LatentCodec.encode gives them), `images` the matching clean images in [-1, 1]. `perceptual` must match
    the config's lpips/convnext weights (None when both are 0). `autocast` (e.g. torch.bfloat16) runs the decoder
    and discriminator under autocast; the losses are computed in float32.
    """

    def __init__(self, vae: nn.Module, config: DecoderFinetuneConfig, perceptual: PerceptualLoss | None = None,
                 autocast: torch.dtype | None = None):
        cfg = self.config = config
        wants = {"lpips": cfg.lpips_weight > 0, "convnext": cfg.convnext_weight > 0}
        has = {"lpips": perceptual is not None and perceptual.lpips is not None,
               "convnext": perceptual is not None and perceptual.convnext is not None}
        if wants != has:
            raise ValueError(f"perceptual networks {has} do not match the config's weights {wants}")
        self.vae, self.perceptual, self.autocast = vae, perceptual, autocast
        self.device = next(vae.parameters()).device
        self.names = trainable_names(vae)
        vae.requires_grad_(False)
        params = [p for n, p in vae.named_parameters() if n in self.names]
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.disc = self.disc_opt = None
        if cfg.gan_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.disc = PatchDiscriminator(width=cfg.disc_width, stages=cfg.disc_stages).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas,
                                              weight_decay=cfg.weight_decay)
        self.lecam_ema = torch.zeros(2)  # EMA of mean D(real), mean D(fake)
        self.step_count = 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def generator_losses(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's loss terms (unweighted) and their weighted sum `total`; fake/real in [-1, 1], float32."""
        cfg = self.config
        terms = {"mse": F.mse_loss((fake + 1) / 2, (real + 1) / 2)}  # on [0, 1] images, as STARFlow
        if self.perceptual is not None:
            terms |= self.perceptual(fake, real)
        if self.disc is not None:
            self.disc.requires_grad_(False)
            with self._autocast():
                terms["gan"] = -self.disc(fake).float().mean()
            self.disc.requires_grad_(True)
        weights = {"mse": cfg.mse_weight, "lpips": cfg.lpips_weight, "convnext": cfg.convnext_weight,
                   "gan": cfg.gan_weight}
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms

    def _discriminator_step(self, fake: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        with self._autocast():
            real_logits, fake_logits = self.disc(real).float(), self.disc(fake.detach()).float()
        hinge = 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
        means = torch.stack([real_logits.mean(), fake_logits.mean()])
        ema = self.lecam_ema.to(self.device)
        # LeCam (Tseng et al. 2021): keep D(real) near the EMA of D(fake) and D(fake) near the EMA of D(real)
        lecam = F.relu(means[0] - ema[1]).pow(2) + F.relu(ema[0] - means[1]).pow(2)
        loss = hinge + cfg.lecam_weight * lecam
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        self.lecam_ema = (cfg.lecam_decay * ema + (1 - cfg.lecam_decay) * means.detach()).cpu()
        return {"disc": hinge.detach(), "lecam": lecam.detach()}

    def step(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
        """One update of the decoder (and discriminator) on a batch; returns the loss terms as floats."""
        cfg, s = self.config, self.step_count
        lr = learning_rate(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        for opt in filter(None, (self.opt, self.disc_opt)):
            for group in opt.param_groups:
                group["lr"] = lr
        noise = torch.randn(latents.shape, generator=generator("decoder-noise", cfg.seed, s))
        z = (latents.float().cpu() + cfg.noise_std * noise).to(self.device)
        real = images.to(self.device, torch.float32)
        self.vae.train()
        with self._autocast():
            fake = self.vae.decode(z / cfg.scale).sample
        fake = fake.float()
        terms = self.generator_losses(fake, real)
        if not torch.isfinite(terms["total"]):
            raise FlowBackError(f"decoder fine-tuning: loss is not finite at step {s} ({terms['total'].item()})")
        self.opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.opt.step()
        if self.disc is not None:
            terms |= self._discriminator_step(fake, real)
        self.vae.eval()
        self.step_count += 1
        return {k: float(v.detach()) for k, v in terms.items()} | {"lr": lr}

    def state_dict(self) -> dict:
        """Tensors and plain values only: save with flowback.io.save_torch, load with weights_only=True."""
        params = dict(self.vae.named_parameters())
        return {"config": asdict(self.config), "step": self.step_count,
                "trained": {n: params[n].detach().cpu().clone() for n in self.names},
                "optimizer": self.opt.state_dict(), "lecam_ema": self.lecam_ema.clone(),
                "discriminator": self.disc.state_dict() if self.disc is not None else None,
                "disc_optimizer": self.disc_opt.state_dict() if self.disc_opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
        if saved != asdict(self.config):
            diff = sorted(k for k in saved.keys() | asdict(self.config).keys()
                          if saved.get(k) != asdict(self.config).get(k))
            raise FlowBackError(f"decoder fine-tuning state was made with other settings ({', '.join(diff)})")
        if sorted(state["trained"]) != sorted(self.names):
            raise FlowBackError("decoder fine-tuning state does not match this VAE's decoder")
        params = dict(self.vae.named_parameters())
        with torch.no_grad():
            for n, t in state["trained"].items():
                params[n].copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.disc_opt.load_state_dict(state["disc_optimizer"])
        self.lecam_ema = state["lecam_ema"].clone()
        self.step_count = int(state["step"])


def finetune_decoder(finetuner: DecoderFinetuner, batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                     save: Callable[[DecoderFinetuner], None] | None = None, save_every: int = 1000,
                     log: Callable[[int, dict[str, float]], None] | None = None) -> nn.Module:
    """Run the remaining steps (from finetuner.step_count to config.steps); returns the VAE, in eval mode.

    `batch_at(step)` gives the (scaled latent means, [-1, 1] images) of a step - a deterministic function of the
    step, so a resumed run sees the batches an uninterrupted one would. `save(finetuner)` is called every
    `save_every` steps and at the end (e.g. save_torch(path, finetuner.state_dict())); `log(step, terms)` each step.
    """
    while finetuner.step_count < finetuner.config.steps:
        terms = finetuner.step(*batch_at(finetuner.step_count))
        if log is not None:
            log(finetuner.step_count, terms)
        if save is not None and (finetuner.step_count % save_every == 0 or
                                 finetuner.step_count == finetuner.config.steps):
            save(finetuner)
    return finetuner.vae.eval().requires_grad_(False)


@torch.no_grad()
def noisy_reconstruction(vae: nn.Module, latents: torch.Tensor, images: torch.Tensor, noise_std: float,
                         scale: float = 0.18215, seed: int = 0, perceptual: PerceptualLoss | None = None,
                         batch_size: int = 32) -> dict[str, float]:
    """Mean MSE ([0, 1] images) and perceptual terms of decoding latents + noise_std * eps: before/after numbers."""
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    for lat, img in zip(latents.split(batch_size), images.split(batch_size)):
        z = (lat.float().cpu() + noise_std * torch.randn(lat.shape, generator=g)).to(device)
        fake, real = vae.decode(z / scale).sample.float(), img.to(device, torch.float32)
        terms = {"mse": F.mse_loss((fake + 1) / 2, (real + 1) / 2)}
        if perceptual is not None:
            terms |= perceptual(fake, real)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(lat)
    return {k: v / len(latents) for k, v in sums.items()}
