"""Turn validated params into library objects. The only place that knows both the params schema and the library."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .models.tarflow import FlowConfig
from .params import Params

if TYPE_CHECKING:
    from .models.af import AFConfig
    from .models.af_objective import AFTrainConfig

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


def af_config(params: Params) -> "AFConfig":
    """The adversarial flow's networks (flowback/models/af.py) from the af: section and the data's shape."""
    from .models.af import AFConfig

    a, d = params.af, params.data
    channels, size = d.channels, d.image_size
    if params.model.latent is not None:
        channels, size = VAE_CHANNELS, d.image_size // VAE_DOWNSAMPLE
    g = a.generator
    return AFConfig(channels=channels, image_size=size, patch_size=g.patch_size, width=g.width, depth=g.depth,
                    head_dim=g.head_dim, mlp_ratio=g.mlp_ratio, num_classes=d.num_classes,
                    disc_width=a.discriminator.width, disc_depth=a.discriminator.depth, steps=a.nfe,
                    any_step=a.any_step, pred=a.pred, repeat=a.repeat)


def af_train_config(params: Params) -> "AFTrainConfig":
    """The adversarial flow objective's settings (flowback/models/af_objective.py) from af.train."""
    from .models.af_objective import AFTrainConfig

    t = params.af.train
    return AFTrainConfig(lr_g=t.lr_g, lr_d=t.lr_d, betas=tuple(t.betas), weight_decay=t.weight_decay,
                         ema_decay=t.ema_decay, ot_start=t.ot.start, ot_end=t.ot.end,
                         ot_decay_steps=t.ot.decay_steps or t.steps, gp_weight=t.gp_weight,
                         gp_fraction=t.gp_fraction, gp_eps=t.gp_eps, cp_weight=t.cp_weight, grad_norm=t.grad_norm,
                         grad_norm_decay=t.grad_norm_decay, grad_clip=t.grad_clip, min_gap=t.min_gap,
                         update=t.update)
