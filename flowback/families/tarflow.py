"""The TARFlow family: TARFlow / STARFlow normalizing flows (flowback/models/tarflow.py), trained by maximum likelihood
with an optional alignment strategy (flowback/training.py), sampled by the inverse flow with guidance, denoising and
a choice of solver (flowback/sampler.py). It has a likelihood, so the training-free classifier and the linear probes
read it, and its training can save milestones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.manifest import data_reads
from ..errors import ParamsError
from .base import Family, Sampled, Trained

if TYPE_CHECKING:
    from ..params import Experiment, Params
    from ..params.schema import ExperimentParams

MODEL_KEYS = ["model", "data.dataset", "data.image_size", "data.classes"]  # what builders.flow_config reads
STRATEGY_NAMES = {"none": "TARFlow baseline", "forward": "Forward", "detach": "Detach", "reverse": "Reverse"}


class TARFlowFamily(Family):
    name = "tarflow"
    has_likelihood = True
    has_guidance = True
    saves_milestones = True
    log_fields = ("bpd", "loss", "align", "lr", "grad_norm")

    # ------------------------------------------------------------------------------------------ params
    def check_run(self, e: "Experiment") -> None:
        from ..alignment.positions import PositionError, parse_position

        p = e.params
        if p.metrics.probe.layers != "every":
            try:
                parse_position(p.metrics.probe.layers, p.model.layers_per_block(), p.align.default_layer,
                               p.align.layer_base)
            except PositionError as err:
                raise ParamsError(f"metrics.probe.layers: {err}") from None

    def label(self, p: "Params", spec: "ExperimentParams") -> str:
        return STRATEGY_NAMES[spec.strategy]

    def describe(self, e: "Experiment") -> str:
        where = ", ".join(f"block {b} layer {l}" for b, l in e.positions) or "-"
        return f"{e.strategy:<8} {e.position or '-':<14} {e.params.train.steps} steps -> {where}"

    def model_reads(self, e: "Experiment") -> list[str]:
        return list(MODEL_KEYS)

    # ------------------------------------------------------------------------------------------ train
    def train_reads(self, e: "Experiment") -> list[str]:
        keys = ["model", "train", *data_reads(e.params)]
        return keys + (["align", "encoder"] if e.strategy != "none" else [])

    def train_inputs(self, e: "Experiment") -> list[str]:
        return [f"{e.params.encoder.dir}/model.safetensors"] if e.strategy != "none" else []

    def train_outs(self, e: "Experiment") -> list[str]:
        from ..params import milestone_path

        return [str(milestone_path(e.run_dir, m)) for m in e.params.train.milestones]

    def train(self, e, device, rank, world, fingerprint, progress, on_log) -> Trained | None:
        from ..checkpoints import save_flow
        from ..data.batches import run_batches
        from ..params import milestone_path
        from ..plan.train import resolve_train_plan
        from ..training import load_validation, train

        p = e.params
        batches, fixed_images = run_batches(p, p.train.batch_size, p.train.checkpoint_every, rank, world, device)
        encoder = None
        if e.strategy != "none":
            from ..alignment.encoder import EncoderConfig, load_encoder

            encoder = load_encoder(p.encoder.dir, fallback=EncoderConfig.of(p.encoder))
        plan = resolve_train_plan(e, world, device)
        state = e.run_dir / ".resume" / "state.pt"
        result = train(e, batches, state, fingerprint, device, rank, world, encoder=encoder,
                       fixed_images=fixed_images, plan=plan, show_progress=progress, on_log=on_log,
                       milestones={m: milestone_path(e.run_dir, m) for m in p.train.milestones},
                       val=load_validation(p) if p.train.val_every and rank == 0 else None)
        if rank != 0:
            return None
        weights = "ema" if p.train.ema_decay > 0 else "raw"
        save_flow(e.run_dir / "model.pt", result.model, experiment=e.name, seed=e.seed, strategy=e.strategy,
                  position=e.position, steps=result.steps, weights=weights)
        state.unlink(missing_ok=True)
        s = result.summary
        message = (f"{e.run}: {s['steps']} steps in {result.seconds:.0f} s, final {s['final_bpd']:.3f} bits/dim"
                   + (f", alignment loss {s['final_align']:.3f}" if s["final_align"] is not None else ""))
        return Trained({**s, "weights": weights}, result.log, result.timing, message)

    # ------------------------------------------------------------------------------------------ sample
    def sample_reads(self, e: "Experiment") -> list[str]:
        keys = ["sample", *MODEL_KEYS, "runtime.gpu_memory_gib", "decoder.enabled"]
        return keys + (["decoder.dir"] if e.params.decoder.enabled else [])

    def sample_inputs(self, e: "Experiment") -> list[str]:
        p = e.params
        if p.decoder.enabled:  # the fine-tuned decoder (the decoder stage's output)
            return [f"{p.decoder.dir}/diffusion_pytorch_model.safetensors"]
        return [p.model.latent.vae_dir] if p.model.latent is not None else []

    def sample(self, e, device, rank, progress, guidance_weight=None, count=None, seed=None,
               chunks="chunks", checkpoint=None) -> Sampled | None:
        import torch

        from ..builders import flow_config
        from ..checkpoints import load_flow
        from ..io import sha256_file
        from ..models.guidance import Guidance
        from ..models.jacobi import Solver
        from ..models.sampling import SampleStats, flow_draw
        from ..plan.sample import resolve_sample_micro_batch
        from ..sampler import generate, sample_labels

        p, sp = e.params, e.params.sample
        g = sp.guidance if guidance_weight is None else sp.guidance.model_copy(update={"weight": guidance_weight})
        seed = sp.seed if seed is None else seed
        checkpoint = e.checkpoint if checkpoint is None else checkpoint
        fc = flow_config(p)
        model, meta = load_flow(checkpoint, expected=fc, device=device, expected_meta=e.model_meta)
        labels = sample_labels(p.data.num_classes, sp.per_class, sp.labels, seed,
                               sp.count if count is None else count)
        dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None
        key = f"{sha256_file(checkpoint)}:{sp.model_dump_json()}:{g.model_dump_json()}:{seed}:{len(labels)}"
        decode = None
        if p.model.latent is not None:  # denoising (below) runs on latents; decoding follows it
            # a decoder fine-tuned on noisy latents (the decoder stage) replaces the VAE's own
            from ..models.vae import latent_decoder

            vae_dir = p.decoder.dir if p.decoder.enabled else p.model.latent.vae_dir
            decode, vae_key = latent_decoder(vae_dir, p.model.latent.scale, device, fc.channels, fc.image_size,
                                             p.data.image_size)
            key = f"{key}:{vae_key}"
        # a decoder fine-tuned on noisy latents replaces the denoising step (STARFlow)
        denoise_sigma = p.model.noise_std if sp.denoise and not p.decoder.enabled else 0.0
        micro = resolve_sample_micro_batch(e, device)
        stats, how = SampleStats(), Solver.of(sp)
        draw = flow_draw(model, Guidance.of(g), denoise_sigma, sp.kv_cache, dtype, solver=how,
                         denoise_scale=sp.denoise_scale, max_redraws=sp.max_redraws)
        images, seconds = generate(draw, (fc.num_tokens, fc.token_dim), labels, e.run_dir / chunks, sp.batch_size,
                                   seed, device, show_progress=progress, decode=decode, key=key, micro_batch=micro,
                                   stats=stats)
        if rank != 0:
            return None
        counts = stats.to_dict()
        record = {"count": int(len(images)), "guidance": g.model_dump(), "denoise": denoise_sigma > 0,
                  "decoder": p.decoder.enabled, "solver": how.to_dict(), "redraws": counts["redraws"],
                  "weights": meta.get("weights", "raw")}
        timing = {"seconds": seconds, "micro_batch": micro, "solver_counts": counts,
                  "images_per_second": len(images) / seconds if seconds > 0 else None}
        return Sampled(images, labels, record, timing)

    # ------------------------------------------------------------------------------------------ evaluate
    def classifier_reads(self, e: "Experiment") -> list[str]:
        return ["metrics.classifier_split", "metrics.classifier_batch_size", "metrics.exhaustive_classifier",
                "runtime.gpu_memory_gib", *MODEL_KEYS]

    def classify(self, e, device, progress) -> dict[str, float | None]:
        from ..metrics.classifier import classifier_accuracy, classifier_inputs, exhaustive_accuracy
        from ..plan.classifier import resolve_classifier_batch

        p = e.params
        model, _ = self.load(e, device)
        inputs, targets = classifier_inputs(p, p.metrics.classifier_split)
        batch = resolve_classifier_batch(e, device)
        out = {"acc": 100.0 * classifier_accuracy(model, inputs, targets, batch, show_progress=progress),
               "acc_exhaustive": None}
        if p.metrics.exhaustive_classifier:
            out["acc_exhaustive"] = 100.0 * exhaustive_accuracy(model, inputs, targets, batch, show_progress=progress)
        return out

    def load(self, e: "Experiment", device):
        from ..builders import flow_config
        from ..checkpoints import load_flow

        return load_flow(e.checkpoint, expected=flow_config(e.params), device=device, expected_meta=e.model_meta)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, e: "Experiment", world: int, val_images: int) -> list:
        """Rows of train (unless a milestone run), sample, sweep (every scale), curve (every milestone) and the
        classifier: (Choice, TFLOP-hours). Sampling as the stages run it (flowback/plan/sample.py): each block
        KV-decoded (twice the rows where guided), then the denoising gradient."""
        import dataclasses

        from ..plan.classifier import plan_classifier
        from ..plan.sample import plan_sample, sampling_flops
        from ..plan.train import plan_flow_train

        p = e.params
        rows = []
        if e.trains:  # a milestone run samples another run's model
            t = plan_flow_train(e, world)  # its FLOPs: one rank's whole step
            rows.append((t, t.steps * t.measure.flops * world / 1e12 / 3600))
        s = plan_sample(e, world)

        def tflop_hours(images: int, weight: float) -> float:
            return images / s.value * sampling_flops(e, s.value, weight) / 1e12 / 3600

        g = p.sample.guidance
        weight = max(p.sweep.scales) if p.sweep.scales else (g.weight if g.method != "none" else 0.0)
        rows.append((s, tflop_hours(p.samples_per_run, weight)))
        if p.sweep.scales:  # every scale of the grid on the trained model: sampling only
            n = p.sweep.count or p.samples_per_run
            rows.append((dataclasses.replace(s, stage="sweep", note=f"{len(p.sweep.scales)} scales x {n}"),
                         sum(tflop_hours(n, w) for w in p.sweep.scales)))
        if p.curve.enabled and e.trains and p.train.milestones:
            n, points = p.curve.count or p.samples_per_run, len(p.train.milestones) + 1
            rows.append((dataclasses.replace(s, stage="curve", note=f"{points} models x {n}"),
                         points * tflop_hours(n, weight)))
        c = plan_classifier(e, val_images)
        rows.append((c, c.steps * c.measure.flops / 1e12 / 3600))
        return rows

FAMILY = TARFlowFamily()
