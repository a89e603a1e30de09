"""Stage `decoder` (latent profiles with decoder.enabled): STARFlow's decoder fine-tuned on noisy latents.

The VAE in model.latent.vae_dir gets its decoder (and post_quant_conv) trained to map z + sigma * eps to the clean
image, on the training split's latent shards and their pixels (flips drawn as in training); sigma is the flow's
training noise. The result, a diffusers VAE in decoder.dir, is what `sample` decodes with, skipping the denoising
step. Resumable: the fine-tuning state is saved every decoder.checkpoint_every steps in decoder.dir/.resume/.
The result depends only on the data, the VAE and these settings, so one directory serves every experiment.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Params
from . import RUNTIME, Outputs, Stage



def reads(p: Params) -> list[str]:
    keys = ["decoder", "model.latent", *RUNTIME, *data_reads(p)]
    return keys + (["model.noise_std"] if p.decoder.noise_std is None else [])


def inputs(p: Params) -> list[str]:
    return [str(p.data.dir), p.model.latent.vae_dir]


def outputs(p: Params) -> Outputs:
    d = p.decoder.dir
    return Outputs(outs=[f"{d}/diffusion_pytorch_model.safetensors", f"{d}/config.json"],
                   files=[f"{d}/metrics.json"])


def run(p: Params, progress: bool = True) -> str:
    from pathlib import Path

    import torch

    from ..data.batches import ShardBatches
    from ..data.images import to_model
    from ..data.manifest import check_prepared
    from ..io import load_torch, save_json, save_torch
    from ..models.decoder_finetune import (DecoderFinetuneConfig, DecoderFinetuner, PerceptualLoss, finetune_decoder,
                                           noisy_reconstruction)
    from ..models.vae import load_vae, save_vae
    from ..progress import progress as tqdm
    from ..runtime import configure

    dev = configure(p.runtime)
    dp, lp = p.decoder, p.model.latent
    check_prepared(p)
    sigma = p.model.noise_std if dp.noise_std is None else dp.noise_std
    cfg = DecoderFinetuneConfig(steps=dp.steps, noise_std=sigma, scale=lp.scale, lr=dp.lr, min_lr=dp.min_lr,
                                warmup_steps=dp.warmup_steps, weight_decay=dp.weight_decay, mse_weight=dp.mse_weight,
                                lpips_weight=dp.lpips_weight, convnext_weight=dp.convnext_weight,
                                gan_weight=dp.gan_weight, lecam_weight=dp.lecam_weight, disc_width=dp.disc_width,
                                seed=dp.seed)
    wants_perceptual = dp.lpips_weight > 0 or dp.convnext_weight > 0
    perceptual = (PerceptualLoss(dp.lpips_weight > 0, dp.convnext_weight > 0, dp.weights_dir).to(dev)
                  if wants_perceptual else None)
    vae = load_vae(lp.vae_dir, dev)
    tuner = DecoderFinetuner(vae, cfg, perceptual, torch.bfloat16 if dp.dtype == "bfloat16" else None)
    state = Path(dp.dir) / ".resume" / "state.pt"
    if state.exists():
        tuner.load_state_dict(load_torch(state, map_location=dev))
    batches = ShardBatches(p.data.dir, "train", dp.batch_size, dp.seed, dp.checkpoint_every, flip=True)

    def batch_at(step: int):
        b = batches.get(step)
        return b.x.to(dev), to_model(b.pixels).to(dev)

    held = batches.get(dp.steps + 1)  # a batch past the run's last step: before/after numbers on unseen pairs
    before = noisy_reconstruction(vae, held.x, to_model(held.pixels), sigma, lp.scale, perceptual=perceptual)
    bar = tqdm(total=dp.steps, initial=tuner.step_count, desc="decoder", disable=not progress)
    finetune_decoder(tuner, batch_at, save=lambda t: save_torch(state, t.state_dict()),
                     save_every=dp.checkpoint_every, log=lambda step, terms: bar.update(1))
    bar.close()
    after = noisy_reconstruction(vae, held.x, to_model(held.pixels), sigma, lp.scale, perceptual=perceptual)
    save_vae(vae, dp.dir)
    save_json(Path(dp.dir) / "metrics.json", {"noise_std": sigma, "steps": dp.steps, "before": before,
                                              "after": after})
    state.unlink(missing_ok=True)
    return (f"decoder: fine-tuned on noisy latents (sigma {sigma}) for {dp.steps} steps: reconstruction MSE "
            f"{before['mse']:.4f} -> {after['mse']:.4f} -> {dp.dir}")


STAGE = Stage(name="decoder", doc="STARFlow's VAE decoder fine-tuned on noisy latents (latent profiles that enable it)", reads=reads, outputs=outputs, run=run, switch="decoder.enabled", inputs=inputs,
              resumes="the last saved fine-tuning state (.resume/state.pt in decoder.dir)")
