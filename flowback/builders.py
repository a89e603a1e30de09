"""Turn validated params into library objects. The only place that knows both the params schema and the library."""

from __future__ import annotations

from .alignment import AlignSpec, EncoderConfig
from .models.tarflow import FlowConfig
from .params import EncoderParams, Experiment, Params

VAE_DOWNSAMPLE = 8  # stable-diffusion VAEs: 256 px -> 32 x 32 x 4 latents
VAE_CHANNELS = 4


def flow_config(params: Params) -> FlowConfig:
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
    )


def align_spec(exp: Experiment) -> AlignSpec | None:
    if exp.strategy == "none":
        return None
    return AlignSpec(exp.strategy, tuple(exp.positions))


def encoder_config(e: EncoderParams) -> EncoderConfig:
    return EncoderConfig(arch=e.arch, kwargs=dict(e.kwargs), input_size=e.input_size, mean=tuple(e.mean),
                         std=tuple(e.std))
