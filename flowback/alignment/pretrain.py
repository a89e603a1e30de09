"""Train the default profile's frozen encoder: a tiny DINOv2-architecture timm ViT, supervised on the embedded data.

The paper aligns to DINOv2 ViT-B/14, which cannot be downloaded on an offline machine. The default profile instead
trains a ViT of the same timm family (`vit_small_patch14_dinov2` resized by keyword arguments) to classify the
training split, so its patch tokens carry class semantics the flow can be aligned to. It is saved in the same
directory format as a fetched DINOv2 and loaded by the same `load_encoder`, so alignment code is identical.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from ..progress import progress as tqdm

from ..data.images import to_model
from .encoder import EncoderConfig, preprocess


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to max_shift pixels (edge padded): cheap augmentation for tiny data sets."""
    B, _, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dy, dx = torch.randint(0, 2 * p + 1, (2, B), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def train_encoder(images_u8: torch.Tensor, labels: torch.Tensor, cfg: EncoderConfig, num_classes: int, steps: int,
                  batch_size: int, lr: float, seed: int, show_progress: bool = True) -> tuple[nn.Module, nn.Module]:
    """Supervised training of timm `cfg.arch` (with cfg.kwargs) plus a linear head on mean-pooled patch tokens.

    Returns (encoder, probe head); only the encoder is saved.
    """
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
