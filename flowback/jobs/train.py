"""Stage `train`: train one run of the grid (an experiment at one training seed) on the train split.

    python -m stages.train --experiment E-s0
    torchrun --nproc_per_node 8 -m stages.train --experiment E-s0      # DDP, one GPU per rank

Outputs in results/runs/<run>/: model.pt (flow config + weights), train.json (final bpd / alignment loss: science),
train_log.csv (the curves; rewritten atomically at every log step, so `dvc plots show` can follow a live run),
train_timing.json (seconds, images/s, the step plan). A killed run resumes from results/runs/<run>/.resume/state.pt.
The embedded default trains from memory; ImageNet profiles stream the shards (flowback.data.batches.ShardBatches).
`train.micro_batch` / `train.checkpointing` may be `auto`: the memory plan (flowback/plan.py) then chooses them for
`runtime.gpu_memory_gib` before any work, and a run that cannot fit is an error naming the experiment.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Experiment, milestone_path
from . import RUNTIME, Outputs

PER_RUN = True
LAUNCHED = True
# how the steps are computed, not what they compute: left out of the resume fingerprint
PERF_KEYS = ("train.micro_batch", "train.checkpointing", "train.compile", "train.workers", "train.log_every",
             "train.milestones", "runtime.device", "runtime.threads", "runtime.tf32", "runtime.gpu_memory_gib")


def applies(e: Experiment) -> bool:
    """A milestone experiment reads another run's model: it has no training of its own."""
    return e.trains


def reads(e: Experiment) -> list[str]:
    if e.family == "af":  # an adversarial flow: the af: section; of train: only its seed (and streaming settings)
        stream = [] if e.params.data.dataset == "digits" else ["train.workers", "train.shuffle_buffer", "train.flip"]
        return [f"experiments.{e.name}", "results", "af", "train.seed", "model.latent", *stream, *RUNTIME,
                "runtime.gpu_memory_gib", *data_reads(e.params)]
    keys = [f"experiments.{e.name}", "results", "model", "train", *RUNTIME, "runtime.gpu_memory_gib",
            *data_reads(e.params)]
    if e.strategy != "none":
        keys += ["align", "encoder"]
    return keys


def inputs(e: Experiment) -> list[str]:
    deps = [str(e.params.data.dir)]
    if e.strategy != "none":
        deps.append(f"{e.params.encoder.dir}/model.safetensors")
    return deps


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    milestones = [str(milestone_path(d, m)) for m in e.params.train.milestones] if e.family != "af" else []
    return Outputs(outs=[f"{d}/model.pt", *milestones], metrics=[f"{d}/train.json"], plots=[f"{d}/train_log.csv"],
                   files=[f"{d}/train_timing.json"])


def run(e: Experiment, progress: bool = True) -> str:
    from ..checkpoints import save_flow
    from ..distributed import setup
    from ..io import save_csv, save_json
    from ..plan.train import resolve_train_plan
    from ..runtime import configure
    from ..training import train

    p = e.params
    dev, rank, world = setup(configure(p.runtime))
    if e.family == "af":
        return _run_af(e, dev, rank, world, progress)
    batches, fixed_images = _batches(e, rank, world, dev)
    encoder = None
    if e.strategy != "none":
        from ..alignment.encoder import EncoderConfig, load_encoder

        encoder = load_encoder(p.encoder.dir, fallback=EncoderConfig.of(p.encoder))
    plan = resolve_train_plan(e, world, dev)
    run_dir = e.run_dir
    state = run_dir / ".resume" / "state.pt"
    log_path = run_dir / "train_log.csv"
    result = train(e, batches, state, dev, rank, world, encoder=encoder, fixed_images=fixed_images, plan=plan,
                   show_progress=progress, on_log=lambda log: save_csv(log_path, log),
                   milestones={m: milestone_path(run_dir, m) for m in p.train.milestones})
    if rank != 0:
        return ""
    save_flow(run_dir / "model.pt", result.model, experiment=e.name, seed=e.seed, strategy=e.strategy,
              position=e.position, steps=result.steps)
    save_csv(log_path, result.log)
    save_json(run_dir / "train.json", result.summary)
    save_json(run_dir / "train_timing.json", result.timing)
    state.unlink(missing_ok=True)
    s = result.summary
    return (f"{e.run}: {s['steps']} steps in {result.seconds:.0f} s, final {s['final_bpd']:.3f} bits/dim"
            + (f", alignment loss {s['final_align']:.3f}" if s["final_align"] is not None else ""))


def _run_af(e: Experiment, dev, rank: int, world: int, progress: bool) -> str:
    """An adversarial flow (family af): flowback.af_training.train_af on this rank's batches."""
    import time

    from ..af_training import train_af
    from ..builders import af_config, af_train_config
    from ..checkpoints import save_generator
    from ..io import save_csv, save_json
    from ..plan.train import plan_af

    p, at = e.params, e.params.af.train
    plan_af(e, world)  # a step that cannot fit the budget stops here, before any work
    batches, _ = _batches(e, rank, world, dev, batch_size=at.batch_size, segment=at.checkpoint_every)
    run_dir = e.run_dir
    state_path, log_path = run_dir / ".resume" / "state.pt", run_dir / "train_log.csv"
    t0 = time.perf_counter()
    state = train_af(af_config(p), None, None, at.steps, at.batch_size, seed=p.train.seed, train=af_train_config(p),
                     device=dev, state_path=state_path, checkpoint_every=at.checkpoint_every, log_every=at.log_every,
                     show_progress=progress, batches=batches, rank=rank, on_log=lambda log: save_csv(log_path, log))
    seconds = time.perf_counter() - t0
    if rank != 0:
        return ""
    save_generator(run_dir / "model.pt", state.ema, experiment=e.name, seed=e.seed, family="af", steps=at.steps)
    save_csv(log_path, state.log)
    tail = state.log[-max(1, len(state.log) // 5):]
    summary = {"steps": at.steps, "params_millions": sum(q.numel() for q in state.generator.parameters()) / 1e6,
               **{f"final_{k}": sum(r[k] for r in tail) / len(tail) for k in ("d_loss", "g_loss", "ot")}}
    save_json(run_dir / "train.json", summary)
    save_json(run_dir / "train_timing.json", {"seconds": seconds, "processes": world,
                                              "images_per_second": at.steps * at.batch_size / seconds})
    state_path.unlink(missing_ok=True)
    return f"{e.run}: adversarial flow, {at.steps} steps in {seconds:.0f} s, final OT term {summary['final_ot']:.4f}"


def _batches(e: Experiment, rank: int, world: int, dev, batch_size: int | None = None, segment: int | None = None):
    """(this rank's Batches, the in-memory training images or None)."""
    import torch

    p, tp = e.params, e.params.train
    batch_size = batch_size or tp.batch_size
    segment = segment or tp.checkpoint_every
    if p.data.dataset == "digits":
        from ..data.batches import MemoryBatches
        from ..data.manifest import load_split

        images, labels = (torch.from_numpy(a) for a in load_split(p, "train"))
        return MemoryBatches(images, labels, batch_size, tp.seed, rank=rank, world=world), images
    from ..data.batches import ShardBatches
    from ..data.manifest import check_prepared

    check_prepared(p)  # streamed shards must match these params, as load_split insists
    return ShardBatches(p.data.dir, "train", batch_size, tp.seed, segment, rank=rank, world=world,
                        workers=tp.workers, shuffle_buffer=tp.shuffle_buffer, flip=tp.flip,
                        pin_memory=dev.type == "cuda"), None
