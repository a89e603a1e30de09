"""Stage `sample`: class-balanced samples of one run's flow (KV-cached inverse), ADM-format .npz + PNG grid.

Outputs in results/runs/<run>/: samples.npz (arr_0 uint8 NHWC, arr_1 labels), samples.png, sample.json (what was
drawn: count, guidance, denoising) and sample_timing.json. Resumable: chunks are kept in results/runs/<run>/chunks/
until the .npz is written. Sharded: `torchrun --nproc_per_node 8 -m stages.sample --experiment E-s0` makes every 8th chunk per
GPU (50K images in the paper profiles: sample.per_class 50 x 1000 classes); rank 0 writes the outputs. Latent mode
(model.latent): the flow samples and denoises VAE latents, which are decoded to data.image_size pixels.
"""

from __future__ import annotations

from ..params import Experiment
from . import FLOW_KEYS, RUNTIME, Outputs

PER_RUN = True
LAUNCHED = True


def reads(e: Experiment) -> list[str]:
    keys = [f"experiments.{e.name}", "results", "sample", *FLOW_KEYS, *RUNTIME, "runtime.gpu_memory_gib",
            "decoder.enabled"]
    if e.params.decoder.enabled:
        keys += ["decoder.dir"]
    return keys


def inputs(e: Experiment) -> list[str]:
    deps = [f"{e.run_dir}/model.pt"]
    if e.params.decoder.enabled:  # the fine-tuned decoder (the decoder stage's output)
        deps.append(f"{e.params.decoder.dir}/diffusion_pytorch_model.safetensors")
    elif e.params.model.latent is not None:
        deps.append(e.params.model.latent.vae_dir)
    return deps


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    return Outputs(outs=[f"{d}/samples.npz"], metrics=[f"{d}/sample.json"],
                   files=[f"{d}/samples.png", f"{d}/sample_timing.json"])


def run(e: Experiment, progress: bool = True) -> str:
    import shutil

    import numpy as np
    import torch

    from ..builders import flow_config
    from ..checkpoints import load_flow
    from ..distributed import setup
    from ..io import save_json, sha256_file
    from ..plan.sample import resolve_sample_micro_batch
    from ..runtime import configure
    from ..plots import image_grid, save_png
    from ..sampler import balanced_labels, generate, guidance, solver

    p, sp = e.params, e.params.sample
    dev, rank, _ = setup(configure(p.runtime))
    run_dir = e.run_dir
    model, _ = load_flow(run_dir / "model.pt", expected=flow_config(p), device=dev)
    labels = balanced_labels(p.data.num_classes, sp.per_class)
    dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None
    key = f"{sha256_file(run_dir / 'model.pt')}:{sp.model_dump_json()}"
    decode = None
    if p.model.latent is not None:  # denoising (below) runs on latents; decoding follows it
        decode, vae_key = _latent_decoder(p, dev)
        key = f"{key}:{vae_key}"
    # a decoder fine-tuned on noisy latents replaces the denoising step (STARFlow)
    denoise_sigma = p.model.noise_std if sp.denoise and not p.decoder.enabled else 0.0
    micro = resolve_sample_micro_batch(e, dev)
    from ..models.sampling import SampleStats

    stats, how = SampleStats(), solver(sp)
    images, seconds = generate(model, labels, run_dir / "chunks", sp.batch_size, sp.seed, guidance(sp.guidance),
                               denoise_sigma, sp.kv_cache, dtype,
                               show_progress=progress, decode=decode, key=key, micro_batch=micro, solver=how,
                               max_redraws=sp.max_redraws, denoise_scale=sp.denoise_scale, stats=stats)
    if rank != 0:
        return ""
    from ..io import save_npz

    save_npz(run_dir / "samples.npz", arr_0=images, arr_1=labels)
    save_png(run_dir / "samples.png", image_grid(images, labels, p.data.num_classes))
    counts = stats.to_dict()
    save_json(run_dir / "sample.json", {"count": int(len(images)), "guidance": sp.guidance.model_dump(),
                                        "denoise": denoise_sigma > 0, "decoder": p.decoder.enabled,
                                        "solver": how.to_dict(), "redraws": counts["redraws"]})
    save_json(run_dir / "sample_timing.json", {"seconds": seconds, "micro_batch": micro, "solver_counts": counts,
                                               "images_per_second": len(images) / seconds if seconds > 0 else None})
    shutil.rmtree(run_dir / "chunks", ignore_errors=True)
    return f"{e.run}: {len(images)} samples ({np.bincount(labels).min()} per class) in {seconds:.0f} s"


def _latent_decoder(p, dev):
    """The VAE's decode (latents -> [-1, 1] pixels) and a key naming it; its grid must match the flow's latents."""
    from ..builders import VAE_CHANNELS, VAE_DOWNSAMPLE, flow_config
    from ..io import FlowBackFileError
    from ..models.vae import LatentCodec, load_vae, vae_fingerprint  # diffusers only for latent mode

    lp = p.model.latent
    vae_dir = p.decoder.dir if p.decoder.enabled else lp.vae_dir
    codec = LatentCodec(load_vae(vae_dir, dev), lp.scale)
    cfg = flow_config(p)
    if codec.latent_channels != cfg.channels or cfg.image_size * codec.factor != p.data.image_size:
        raise FlowBackFileError(
            f"{vae_dir}: this VAE decodes {codec.latent_channels}-channel latents, upsampling by "
            f"{codec.factor}, but params give flow latents {cfg.channels} x {cfg.image_size} x {cfg.image_size} "
            f"for data.image_size {p.data.image_size} (latent mode assumes a Stable-Diffusion VAE: "
            f"{VAE_CHANNELS} channels, factor {VAE_DOWNSAMPLE}, data.image_size a multiple of {VAE_DOWNSAMPLE})")
    return codec.decode, f"vae={vae_fingerprint(vae_dir)}:scale={lp.scale}"
