"""Stage `sample`: class-balanced samples of one experiment's flow (KV-cached inverse), ADM-format .npz + PNG grid.

Outputs in results/runs/<experiment>/: samples.npz (arr_0 uint8 NHWC, arr_1 labels), samples.png, sample.json.
Resumable: chunks are kept in results/runs/<experiment>/chunks/ until the .npz is written.
Sharded: `torchrun --nproc_per_node 8 -m stages.sample --experiment E` makes every 8th chunk per GPU (50K images in
the paper profiles: sample.per_class 50 x 1000 classes); rank 0 writes the outputs.
Latent mode (model.latent): the flow samples and denoises VAE latents, which are decoded to data.image_size pixels.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import torch
from PIL import Image

from flowback.builders import VAE_CHANNELS, VAE_DOWNSAMPLE, device as pick_device, flow_config, guidance, set_threads
from flowback.checkpoints import load_flow
from flowback.io import FlowBackFileError, save_json, save_npz, sha256_file, write_bytes
from flowback.sampler import balanced_labels, generate, image_grid
from flowback.stage import run_stage


def body(params, exp, args):
    from flowback.distributed import setup

    p = exp.params
    sp = p.sample
    set_threads(p.train.threads)
    dev, rank, _ = setup(pick_device(sp.device))
    run_dir = params.run_dir(exp.name)
    model, _ = load_flow(run_dir / "model.pt", expected=flow_config(p), device=dev)
    labels = balanced_labels(p.data.num_classes, sp.per_class)
    dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None
    key = f"{sha256_file(run_dir / 'model.pt')}:{sp.model_dump_json()}"
    decode = None
    if p.model.latent is not None:  # denoising (below) runs on latents; decoding follows it
        decode, vae_key = latent_decoder(p, dev)
        key = f"{key}:{vae_key}"
    images, seconds = generate(model, labels, run_dir / "chunks", sp.batch_size, sp.seed, guidance(sp.guidance),
                               p.model.noise_std if sp.denoise else 0.0, sp.kv_cache, dtype,
                               show_progress=not args.quiet, decode=decode, key=key)
    if rank != 0:
        return
    save_npz(run_dir / "samples.npz", arr_0=images, arr_1=labels)
    grid = image_grid(images, labels, p.data.num_classes)
    png = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png, format="PNG")
    write_bytes(run_dir / "samples.png", png.getvalue())
    save_json(run_dir / "sample.json", {"count": int(len(images)), "seconds": seconds,
                                        "images_per_second": len(images) / seconds if seconds > 0 else None,
                                        "guidance": sp.guidance.model_dump(), "denoise": sp.denoise})
    shutil.rmtree(run_dir / "chunks", ignore_errors=True)
    print(f"{exp.name}: {len(images)} samples ({np.bincount(labels).min()} per class) in {seconds:.0f} s")


def latent_decoder(p, dev):
    """The VAE's decode (latents -> [-1, 1] pixels) and a key naming it; its grid must match the flow's latents."""
    from flowback.models.vae import LatentCodec, load_vae, vae_fingerprint  # diffusers only for latent mode

    lp = p.model.latent
    codec = LatentCodec(load_vae(lp.vae_dir, dev), lp.scale)
    cfg = flow_config(p)
    if codec.latent_channels != cfg.channels or cfg.image_size * codec.factor != p.data.image_size:
        raise FlowBackFileError(
            f"{lp.vae_dir}: this VAE decodes {codec.latent_channels}-channel latents, upsampling by "
            f"{codec.factor}, but params give flow latents {cfg.channels} x {cfg.image_size} x {cfg.image_size} "
            f"for data.image_size {p.data.image_size} (latent mode assumes a Stable-Diffusion VAE: "
            f"{VAE_CHANNELS} channels, factor {VAE_DOWNSAMPLE}, data.image_size a multiple of {VAE_DOWNSAMPLE})")
    return codec.decode, f"vae={vae_fingerprint(lp.vae_dir)}:scale={lp.scale}"


def main(argv=None):
    run_stage("sample", body, argv, per_experiment=True)


if __name__ == "__main__":
    main()
