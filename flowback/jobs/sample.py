"""Stage `sample`: class-balanced samples of one run's flow (KV-cached inverse), ADM-format .npz + PNG grid.

Outputs in results/runs/<run>/: samples.npz (arr_0 uint8 NHWC, arr_1 labels), samples.png, sample.json (what was
drawn: count, guidance, denoising) and sample_timing.json. Resumable: chunks are kept in results/runs/<run>/chunks/
until the .npz is written. Sharded: `torchrun --nproc_per_node 8 -m stages.sample --experiment E-s0` makes every 8th chunk per
GPU (50K images in the paper profiles: sample.per_class 50 x 1000 classes); rank 0 writes the outputs. Latent mode
(model.latent): the flow samples and denoises VAE latents, which are decoded to data.image_size pixels.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..params import Experiment
from . import FLOW_KEYS, RUNTIME, Outputs

PER_RUN = True
LAUNCHED = True


AF_SAMPLE_KEYS = ["sample.per_class", "sample.labels", "sample.batch_size", "sample.seed", "sample.dtype"]  # all an `af` run reads


def reads(e: Experiment) -> list[str]:
    if e.family == "af":  # an adversarial flow: one (or af.nfe) network evaluations, nothing of the flow's sampling
        return [*e.source_keys, "results", *AF_SAMPLE_KEYS, "af", "model.latent", "data.dataset",
                "data.image_size", "data.classes", *RUNTIME]
    keys = [*e.source_keys, "results", "sample", *FLOW_KEYS, *RUNTIME, "runtime.gpu_memory_gib",
            "decoder.enabled"]
    if e.params.decoder.enabled:
        keys += ["decoder.dir"]
    return keys


def inputs(e: Experiment) -> list[str]:
    deps = [str(e.checkpoint)]
    if e.family == "af":
        return deps + ([e.params.model.latent.vae_dir] if e.params.model.latent is not None else [])
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
    from ..sampler import sample_labels, generate, guidance, solver

    p, sp = e.params, e.params.sample
    dev, rank, _ = setup(configure(p.runtime))
    if e.family == "af":
        return _run_af(e, dev, rank, progress)
    run_dir = e.run_dir
    model, _ = load_flow(e.checkpoint, expected=flow_config(p), device=dev)
    labels = sample_labels(p.data.num_classes, sp.per_class, sp.labels, sp.seed)
    dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None
    key = f"{sha256_file(e.checkpoint)}:{sp.model_dump_json()}"
    decode = None
    if p.model.latent is not None:  # denoising (below) runs on latents; decoding follows it
        # a decoder fine-tuned on noisy latents (the decoder stage) replaces the VAE's own
        decode, vae_key = _latent_decoder(p, dev, p.decoder.dir if p.decoder.enabled else p.model.latent.vae_dir)
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


def _run_af(e: Experiment, dev, rank: int, progress: bool) -> str:
    """An adversarial flow's samples: z ~ N(0, I) per chunk, then af.nfe evaluations of the generator."""
    import json
    import shutil

    import numpy as np
    import torch

    from ..builders import af_config
    from ..checkpoints import load_generator
    from ..io import save_json, save_npz, sha256_file
    from ..models.af import sample_af
    from ..plots import image_grid, save_png
    from ..sampler import sample_labels, generate

    p, sp, run_dir = e.params, e.params.sample, e.run_dir
    model, _ = load_generator(e.checkpoint, expected=af_config(p), device=dev)
    labels = sample_labels(p.data.num_classes, sp.per_class, sp.labels, sp.seed)
    dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None
    settings = {k.split(".")[1]: getattr(sp, k.split(".")[1]) for k in AF_SAMPLE_KEYS}
    key = f"{sha256_file(e.checkpoint)}:{json.dumps(settings, sort_keys=True)}"
    decode = None
    if p.model.latent is not None:
        decode, vae_key = _latent_decoder(p, dev, p.model.latent.vae_dir, af_config(p).channels,
                                          af_config(p).image_size)
        key = f"{key}:{vae_key}"
    images, seconds = generate(model, labels, run_dir / "chunks", sp.batch_size, sp.seed, dtype=dtype,
                               show_progress=progress, decode=decode, key=key,
                               draw=lambda y, z: sample_af(model, y, z=z, dtype=dtype))
    if rank != 0:
        return ""
    save_npz(run_dir / "samples.npz", arr_0=images, arr_1=labels)
    save_png(run_dir / "samples.png", image_grid(images, labels, p.data.num_classes))
    save_json(run_dir / "sample.json", {"count": int(len(images)), "family": "af", "nfe": p.af.nfe})
    save_json(run_dir / "sample_timing.json", {"seconds": seconds,
                                               "images_per_second": len(images) / seconds if seconds > 0 else None})
    shutil.rmtree(run_dir / "chunks", ignore_errors=True)
    return f"{e.run}: {len(images)} samples ({np.bincount(labels).min()} per class), {p.af.nfe} NFE, in {seconds:.1f} s"


def _latent_decoder(p, dev, vae_dir: str, channels: int | None = None, size: int | None = None):
    """The decode (latents -> [-1, 1] pixels) of the VAE in `vae_dir` and a key naming it; its grid must match the
    model's latents (the flow's, or `channels` x `size` for another family)."""
    from ..builders import VAE_CHANNELS, VAE_DOWNSAMPLE, flow_config
    from ..io import FlowBackFileError
    from ..models.vae import LatentCodec, load_vae, vae_fingerprint  # diffusers only for latent mode

    lp = p.model.latent
    codec = LatentCodec(load_vae(vae_dir, dev), lp.scale)
    cfg = flow_config(p) if channels is None else SimpleNamespace(channels=channels, image_size=size)
    if codec.latent_channels != cfg.channels or cfg.image_size * codec.factor != p.data.image_size:
        raise FlowBackFileError(
            f"{vae_dir}: this VAE decodes {codec.latent_channels}-channel latents, upsampling by "
            f"{codec.factor}, but params give flow latents {cfg.channels} x {cfg.image_size} x {cfg.image_size} "
            f"for data.image_size {p.data.image_size} (latent mode assumes a Stable-Diffusion VAE: "
            f"{VAE_CHANNELS} channels, factor {VAE_DOWNSAMPLE}, data.image_size a multiple of {VAE_DOWNSAMPLE})")
    return codec.decode, f"vae={vae_fingerprint(vae_dir)}:scale={lp.scale}"
