"""The adversarial-flow family (arXiv 2511.22475): a one-step (or `af.nfe`-step) DiT generator trained with an
adversarial loss plus an optimal-transport term (flowback/models/af.py, af_objective.py, flowback/af_training.py),
configured by the `af:` section. It has no likelihood (no training-free classifier, no probe), no alignment strategy,
no classifier-free guidance and no milestones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.manifest import data_reads
from ..io import FlowBackFileError, check_meta, load_torch, save_torch
from .base import Family, Sampled, Trained

if TYPE_CHECKING:
    from ..models.af import AFConfig
    from ..models.af_objective import AFTrainConfig
    from ..params import Experiment, Params
    from ..params.schema import ExperimentParams

TARFLOW_ONLY = ("model", "align", "encoder")  # sections an `af` experiment may not override
SAMPLE_KEYS = ["sample.per_class", "sample.count", "sample.labels", "sample.batch_size", "sample.seed", "sample.dtype"]
MODEL_KEYS = ["af", "model.latent", "data.dataset", "data.image_size", "data.classes"]  # what builders.af_config reads


def af_config(params: "Params") -> "AFConfig":
    """The adversarial flow's networks (flowback/models/af.py) from the af: section and the data's shape."""
    from ..models.af import AFConfig

    a, d = params.af, params.data
    channels, size = d.channels, d.image_size
    if params.model.latent is not None:
        from ..models.config import VAE_CHANNELS, VAE_DOWNSAMPLE

        channels, size = VAE_CHANNELS, d.image_size // VAE_DOWNSAMPLE
    g = a.generator
    return AFConfig(channels=channels, image_size=size, patch_size=g.patch_size, width=g.width, depth=g.depth,
                    head_dim=g.head_dim, mlp_ratio=g.mlp_ratio, num_classes=d.num_classes,
                    disc_width=a.discriminator.width, disc_depth=a.discriminator.depth, nfe=a.nfe,
                    any_step=a.any_step, pred=a.pred, repeat=a.repeat)


def af_train_config(params: "Params") -> "AFTrainConfig":
    """The adversarial flow objective's settings (flowback/models/af_objective.py) from af.train."""
    from ..models.af_objective import AFTrainConfig

    t = params.af.train
    return AFTrainConfig(lr_g=t.lr_g, lr_d=t.lr_d, betas=tuple(t.betas), weight_decay=t.weight_decay,
                         ema_decay=t.ema_decay, ot_start=t.ot.start, ot_end=t.ot.end,
                         ot_decay_steps=t.ot.decay_steps or t.steps, gp_weight=t.gp_weight,
                         gp_fraction=t.gp_fraction, gp_eps=t.gp_eps, cp_weight=t.cp_weight, grad_norm=t.grad_norm,
                         grad_norm_decay=t.grad_norm_decay, grad_clip=t.grad_clip, min_gap=t.min_gap, update=t.update)


def save_generator(path: str | Path, generator, **meta: Any) -> None:
    """An adversarial flow's generator (flowback/models/af.py), marked as such so load_flow refuses it clearly."""
    save_torch(path, {"family": "af", **generator.state(), "meta": meta})


def load_generator(path: str | Path, expected=None, device: str = "cpu", expected_meta: dict | None = None):
    """An adversarial flow's generator for sampling (eval, frozen); another config, or another run's file
    (checkpoints.check_meta), is an error naming the file."""
    from ..models.af import AFConfig, Generator

    state = load_torch(path, map_location=device)
    if not isinstance(state, dict) or state.get("family") != "af":
        raise FlowBackFileError(f"{path}: not an adversarial flow generator checkpoint")
    try:
        cfg = AFConfig.from_dict(state["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise FlowBackFileError(f"{path}: invalid generator config in checkpoint ({e})") from e
    if expected is not None and cfg != expected:
        raise FlowBackFileError(f"{path}: checkpoint is from another generator configuration ({cfg} vs {expected})")
    check_meta(path, state.get("meta", {}), expected_meta)
    try:
        model = Generator.from_state(state)
    except RuntimeError as e:
        raise FlowBackFileError(f"{path}: weights do not fit the generator config ({e})") from e
    return model.to(device).eval().requires_grad_(False), state.get("meta", {})


class AFFamily(Family):
    name = "af"
    has_likelihood = False
    has_guidance = False
    saves_milestones = False
    log_fields = ("d_loss", "g_loss", "ot")

    # ------------------------------------------------------------------------------------------ params
    def check_experiment(self, spec: "ExperimentParams") -> None:
        if spec.strategy != "none":
            raise ValueError(f"strategy {spec.strategy!r}: alignment strategies are TARFlow's (the adversarial flow "
                             f"paper aligns no features); use strategy none for family af")
        bad = [k for k in spec.overrides if k in TARFLOW_ONLY]
        if bad:
            raise ValueError(f"overrides.{bad[0]}: a TARFlow setting; family af is configured by the af: section")

    def label(self, p: "Params", spec: "ExperimentParams") -> str:
        return f"Adversarial flow ({p.af.nfe} NFE)"

    def describe(self, e: "Experiment") -> str:
        g = e.params.af.generator
        return f"{'af':<8} {'-':<14} {e.params.af.train.steps} steps -> DiT width {g.width} x {g.depth}, {e.params.af.nfe} NFE"

    def model_reads(self, e: "Experiment") -> list[str]:
        return list(MODEL_KEYS)

    # ------------------------------------------------------------------------------------------ train
    def train_reads(self, e: "Experiment") -> list[str]:
        stream = [] if e.params.data.dataset == "digits" else ["train.workers", "train.shuffle_buffer", "train.flip"]
        return ["af", "train.seed", "model.latent", *stream, *data_reads(e.params)]

    def train(self, e, device, rank, world, fingerprint, progress, on_log) -> Trained | None:
        import time

        from ..af_training import train_af
        from ..data.batches import run_batches
        from ..plan.af import plan_af_train

        p, at = e.params, e.params.af.train
        plan_af_train(e, world, af_config(p), af_train_config(p))  # a step that cannot fit the budget stops here, first
        batches, _ = run_batches(p, at.batch_size, at.checkpoint_every, rank, world, device)
        state_path = e.run_dir / ".resume" / "state.pt"
        t0 = time.perf_counter()
        state = train_af(af_config(p), None, None, at.steps, at.batch_size, seed=p.train.seed,
                         train=af_train_config(p), device=device, state_path=state_path,
                         checkpoint_every=at.checkpoint_every, log_every=at.log_every, show_progress=progress,
                         batches=batches, rank=rank, on_log=on_log)
        seconds = time.perf_counter() - t0
        if rank != 0:
            return None
        save_generator(e.run_dir / "model.pt", state.ema, experiment=e.name, seed=e.seed, family="af", steps=at.steps,
                       weights="ema")
        state_path.unlink(missing_ok=True)
        tail = state.log[-max(1, len(state.log) // 5):]
        summary = {"steps": at.steps, "params_millions": sum(q.numel() for q in state.generator.parameters()) / 1e6,
                   **{f"final_{k}": sum(r[k] for r in tail) / len(tail) for k in ("d_loss", "g_loss", "ot")},
                   "weights": "ema"}
        timing = {"seconds": seconds, "processes": world, "images_per_second": at.steps * at.batch_size / seconds}
        message = (f"{e.run}: adversarial flow, {at.steps} steps in {seconds:.0f} s, final OT term "
                   f"{summary['final_ot']:.4f}")
        return Trained(summary, state.log, timing, message)

    # ------------------------------------------------------------------------------------------ sample
    def sample_reads(self, e: "Experiment") -> list[str]:
        return [*SAMPLE_KEYS, *MODEL_KEYS]

    def sample_inputs(self, e: "Experiment") -> list[str]:
        return [e.params.model.latent.vae_dir] if e.params.model.latent is not None else []

    def sample(self, e, device, rank, progress, guidance_weight=None, count=None, seed=None,
               chunks="chunks", checkpoint=None) -> Sampled | None:
        import json

        import torch

        from ..io import sha256_file
        from ..models.af import sample_af
        from ..sampler import generate, sample_labels

        p, sp = e.params, e.params.sample
        seed = sp.seed if seed is None else seed
        checkpoint = e.checkpoint if checkpoint is None else checkpoint
        cfg = af_config(p)
        model, _ = load_generator(checkpoint, expected=cfg, device=device, expected_meta=e.model_meta)
        labels = sample_labels(p.data.num_classes, sp.per_class, sp.labels, seed,
                               sp.count if count is None else count)
        dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None
        settings = {k.split(".")[1]: getattr(sp, k.split(".")[1]) for k in SAMPLE_KEYS}
        key = f"{sha256_file(checkpoint)}:{json.dumps(settings, sort_keys=True)}:{seed}:{len(labels)}"
        decode = None
        if p.model.latent is not None:
            from ..models.vae import latent_decoder

            decode, vae_key = latent_decoder(p.model.latent.vae_dir, p.model.latent.scale, device, cfg.channels,
                                             cfg.image_size, p.data.image_size)
            key = f"{key}:{vae_key}"
        images, seconds = generate(lambda y, z, g, stats: sample_af(model, y, z=z, dtype=dtype), cfg.image_shape,
                                   labels, e.run_dir / chunks, sp.batch_size, seed, device, show_progress=progress,
                                   decode=decode, key=key)
        if rank != 0:
            return None
        record = {"count": int(len(images)), "family": "af", "nfe": p.af.nfe, "weights": "ema"}
        timing = {"seconds": seconds, "images_per_second": len(images) / seconds if seconds > 0 else None}
        return Sampled(images, labels, record, timing)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, e: "Experiment", world: int, val_images: int) -> list:
        from ..plan.af import plan_af_train

        t = plan_af_train(e, world, af_config(e.params), af_train_config(e.params))
        return [(t, t.steps * t.measure.flops * world / 1e12 / 3600)]


FAMILY = AFFamily()
