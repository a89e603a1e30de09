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
from ..params import Experiment
from . import RUNTIME, Outputs

PER_RUN = True
LAUNCHED = True
# how the steps are computed, not what they compute: left out of the resume fingerprint
PERF_KEYS = ("train.micro_batch", "train.checkpointing", "train.compile", "train.workers", "train.log_every",
             "runtime.device", "runtime.threads", "runtime.tf32", "runtime.gpu_memory_gib")


def reads(e: Experiment) -> list[str]:
    keys = [f"experiments.{e.name}", "results", "model", "train", *RUNTIME, "runtime.gpu_memory_gib", *data_reads(e.params)]
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
    return Outputs(outs=[f"{d}/model.pt"], metrics=[f"{d}/train.json"], plots=[f"{d}/train_log.csv"],
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
    batches, fixed_images = _batches(e, rank, world, dev)
    encoder = None
    if e.strategy != "none":
        from ..alignment import load_encoder
        from ..builders import encoder_config

        encoder = load_encoder(p.encoder.dir, fallback=encoder_config(p.encoder))
    plan = resolve_train_plan(e, world, dev)
    run_dir = e.run_dir
    state = run_dir / ".resume" / "state.pt"
    log_path = run_dir / "train_log.csv"
    result = train(e, batches, state, dev, rank, world, encoder=encoder, fixed_images=fixed_images, plan=plan,
                   show_progress=progress, on_log=lambda log: save_csv(log_path, log))
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


def _batches(e: Experiment, rank: int, world: int, dev):
    """(this rank's Batches, the in-memory training images or None)."""
    import torch

    p, tp = e.params, e.params.train
    if p.data.dataset == "digits":
        from ..data.batches import MemoryBatches
        from ..data.manifest import load_split

        images, labels = (torch.from_numpy(a) for a in load_split(p, "train"))
        return MemoryBatches(images, labels, tp.batch_size, tp.seed, rank=rank, world=world), images
    from ..data.batches import ShardBatches
    from ..data.manifest import check_prepared

    check_prepared(p)  # streamed shards must match these params, as load_split insists
    return ShardBatches(p.data.dir, "train", tp.batch_size, tp.seed, tp.checkpoint_every, rank=rank, world=world,
                        workers=tp.workers, shuffle_buffer=tp.shuffle_buffer, flip=tp.flip,
                        pin_memory=dev.type == "cuda"), None
