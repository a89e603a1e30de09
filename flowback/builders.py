"""The flow's config from validated params (the adversarial flow's builders live with its family,
flowback/families/af.py; the samplers' settings are Guidance.of and Solver.of)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .models.config import VAE_CHANNELS, VAE_DOWNSAMPLE, FlowConfig

if TYPE_CHECKING:
    from .params import Params


def flow_config(params: "Params") -> FlowConfig:
    m, d = params.model, params.data
    channels, size = d.channels, d.image_size
    if m.latent is not None:
        channels, size = VAE_CHANNELS, d.image_size // VAE_DOWNSAMPLE
    return FlowConfig(
        channels=channels,
        image_size=size,
        patch_size=m.patch_size,
        width=m.width,
        layers=tuple(m.layers_per_block()),
        head_dim=m.head_dim,
        mlp_ratio=m.mlp_ratio,
        num_classes=d.num_classes,
        pos_embed=m.pos_embed,
        cond_blocks=m.cond_blocks,
        start_token=m.start_token,
        final_norm=m.final_norm,
        scale=m.scale,
        soft_clip=m.soft_clip,
        cond_token=m.cond_token,
        mlp=m.mlp,
        seq_order=m.seq_order,
        rope_layout=m.rope_layout,
        rope_order=m.rope_order,
        null_class=m.null_class,
    )
