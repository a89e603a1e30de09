"""Train the default profile's frozen encoder: a tiny DINOv2-architecture timm ViT, trained on the embedded data.

The paper aligns to DINOv2 ViT-B/14, which cannot be downloaded on an offline machine. The default profile instead
trains a ViT of the same timm family (`vit_small_patch14_dinov2` resized by keyword arguments) on the training
split. It is saved in the same directory format as a fetched DINOv2 and loaded by the same `load_encoder`, so
alignment code is identical.

Two objectives (`OBJECTIVES`):
- "supervised": classify the digits (cross-entropy on mean-pooled patch tokens). Its patch features are mostly
  class identity (class means explain ~3/4 of their variance on val), so alignment to them mostly injects labels.
- "simclr": label-free contrastive learning (SimCLR's NT-Xent between two augmented views of each image, on
  mean-pooled patch tokens through a projection head that is discarded). Like DINOv2's, its features are learned
  without labels: class is linearly decodable from them, yet class means explain little more of their variance than
  of the pixels' own, so alignment transfers a representation rather than the label.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import random_shift
from ..data.images import to_model
from ..errors import FlowBackError
from ..progress import progress as tqdm
from .encoder import EncoderConfig, preprocess


class EncoderObjectiveError(FlowBackError):
    """An encoder training objective FlowBack does not know."""


from .choices import ENCODER_OBJECTIVES as OBJECTIVES  # noqa: E402


def train_encoder(images_u8: torch.Tensor, labels: torch.Tensor, cfg: EncoderConfig, num_classes: int, steps: int,
                  batch_size: int, lr: float, seed: int, show_progress: bool = True, objective: str = "supervised",
                  temperature: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """Train timm `cfg.arch` (with cfg.kwargs) with `objective`; returns (encoder, linear head on mean-pooled patch
    tokens). Only the encoder is saved.

    "supervised": the head is trained with the encoder. "simclr": the encoder is trained by `train_encoder_simclr`,
    which is never given the labels; the head is a linear probe fitted afterwards on its frozen features, so that
    `probe_accuracy` reports the same kind of number for both.
    """
    if objective == "simclr":
        net, _ = train_encoder_simclr(images_u8, cfg, steps, batch_size, lr, seed, temperature, show_progress)
        return net, fit_linear_head(net, cfg, images_u8, labels, num_classes)
    if objective != "supervised":
        raise EncoderObjectiveError(f"encoder.train.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    torch.manual_seed(seed)
    net = timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs)
    in_chans = int(net.patch_embed.proj.in_channels)
    head = nn.Linear(net.num_features, num_classes)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    net.train()
    bar = tqdm(range(steps), desc="encoder", disable=not show_progress)
    for _ in bar:
        idx = torch.randint(0, len(images_u8), (batch_size,), generator=g)
        x = preprocess(random_shift(to_model(images_u8[idx]), g), cfg, in_chans)
        tokens = net.forward_features(x)[:, net.num_prefix_tokens :]
        loss = F.cross_entropy(head(tokens.mean(dim=1)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval(), head.eval()


@torch.no_grad()
def probe_accuracy(net: nn.Module, head: nn.Module, cfg: EncoderConfig, images_u8: torch.Tensor,
                   labels: torch.Tensor) -> float:
    in_chans = int(net.patch_embed.proj.in_channels)
    tokens = net.forward_features(preprocess(to_model(images_u8), cfg, in_chans))[:, net.num_prefix_tokens :]
    return (head(tokens.mean(dim=1)).argmax(-1) == labels).float().mean().item()


def random_affine(x: torch.Tensor, g: torch.Generator, rotate_deg: float = 10.0, scale: float = 0.1,
                  shift_px: float = 2.0, noise: float = 0.1) -> torch.Tensor:
    """A random view of each [-1, 1] image: rotation, scale and shift drawn per image (uniform in +-the given range),
    background-filled, plus Gaussian pixel noise. Views that keep a digit's identity: no flips (they turn a 2 into a
    mirrored glyph) and small angles (a 6 turned far becomes a 9). One batched grid_sample with per-image parameters
    from `g`, so a run is a function of the seed."""
    B, _, H, W = x.shape
    angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(B, generator=g) * 2 - 1) * scale
    shift = (torch.rand(B, 2, generator=g) * 2 - 1) * (2 * shift_px / torch.tensor([W, H]))  # in [-1, 1] units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1  # fill: -1
    return (view + noise * torch.randn(view.shape, generator=g)).clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each of the 2B embeddings must pick its other view among the 2B - 1 others by cosine
    similarity / temperature (cross-entropy, averaged over all 2B anchors)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, positive)


def train_encoder_simclr(images_u8: torch.Tensor, cfg: EncoderConfig, steps: int, batch_size: int, lr: float,
                         seed: int, temperature: float = 0.1,
                         show_progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Label-free training of timm `cfg.arch`: NT-Xent between two `random_affine` views of each image, on mean-pooled
    patch tokens (the features alignment reads) through a 2-layer projection head that is discarded, as in SimCLR.

    Takes no labels by construction. Returns (encoder in eval mode, loss per step).
    """
    torch.manual_seed(seed)
    net = timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs)
    in_chans, dim = int(net.patch_embed.proj.in_channels), int(net.num_features)
    projector = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
    opt = torch.optim.AdamW(list(net.parameters()) + list(projector.parameters()), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    net.train()
    losses = []
    bar = tqdm(range(steps), desc="encoder (simclr)", disable=not show_progress)
    for _ in bar:
        x = to_model(images_u8[torch.randint(0, len(images_u8), (batch_size,), generator=g)])
        views = torch.cat([random_affine(x, g), random_affine(x, g)])
        tokens = net.forward_features(preprocess(views, cfg, in_chans))[:, net.num_prefix_tokens :]
        z1, z2 = projector(tokens.mean(dim=1)).chunk(2)
        loss = nt_xent(z1, z2, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return net.eval(), losses


@torch.no_grad()
def patch_features(net: nn.Module, cfg: EncoderConfig, images_u8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The encoder's patch tokens (N, patches, dim): the features alignment targets."""
    in_chans = int(net.patch_embed.proj.in_channels)
    parts = [net.forward_features(preprocess(to_model(images_u8[i : i + batch_size]), cfg, in_chans))
             for i in range(0, len(images_u8), batch_size)]
    return torch.cat(parts)[:, net.num_prefix_tokens :]


def fit_linear_head(net: nn.Module, cfg: EncoderConfig, images_u8: torch.Tensor, labels: torch.Tensor,
                    num_classes: int) -> nn.Module:
    """A linear probe on the frozen encoder's mean-pooled patch tokens (scikit-learn's multinomial logistic
    regression, L-BFGS: deterministic), as an nn.Linear that `probe_accuracy` can use."""
    from sklearn.linear_model import LogisticRegression

    feats = patch_features(net, cfg, images_u8).mean(dim=1).double().numpy()
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(feats, labels.numpy())
    head = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e9)  # classes absent from the training labels are never predicted
        head.weight[clf.classes_] = torch.from_numpy(clf.coef_).float()
        head.bias[clf.classes_] = torch.from_numpy(clf.intercept_).float()
    return head.eval()


def class_variance_fraction(features: torch.Tensor, labels: torch.Tensor) -> float:
    """How much of the patch features' variance the class explains: 1 - within-class / total sum of squares, per
    patch position (the total is taken around each position's mean, so position is not counted as class).

    1 means each feature is its class's mean at that position (alignment would inject only the label); the same
    number on the raw pixel patches is the data's own floor.
    """
    f = features.double()
    total = (f - f.mean(dim=0)).pow(2).sum()
    within = sum((f[labels == c] - f[labels == c].mean(dim=0)).pow(2).sum() for c in labels.unique())
    return float(1 - within / total)
