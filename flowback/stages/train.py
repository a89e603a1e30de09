"""Stage `train`: train one run of the grid (an experiment at one training seed) on the train split.

    python -m flowback stage train baseline-s0
    torchrun --nproc_per_node 8 -m flowback stage train baseline-s0      # DDP, one GPU per rank

Outputs in results/runs/<run>/: model.pt (config + weights, the EMA ones when train.ema_decay > 0, and which in its
meta), train.json (final losses: science), train_log.csv (the curves; rewritten atomically at every log step, so
`dvc plots show` can follow a live run) and, not tracked, train_timing.json (seconds, images/s, the step plan). A
killed run resumes from results/runs/<run>/.resume/state.pt when that state was saved under the same fingerprint: the
params this stage reads, less those that only say how the steps are computed (NOT_FINGERPRINTED).
"""

from __future__ import annotations

import hashlib
import json

from ..families import family
from ..params import Experiment, values
from . import RUNTIME, Outputs, Stage

# how the steps are computed, not what they compute: changing one mid-run keeps the resume state
NOT_FINGERPRINTED = ("train.micro_batch", "train.checkpointing", "train.compile", "train.workers", "train.log_every",
                     "train.milestones", "runtime.device", "runtime.threads", "runtime.tf32",
                     "runtime.gpu_memory_gib")


def reads(e: Experiment) -> list[str]:
    return [f"experiments.{e.name}", "results", *RUNTIME, "runtime.gpu_memory_gib", *family(e.family).train_reads(e)]


def inputs(e: Experiment) -> list[str]:
    return [str(e.params.data.dir), *family(e.family).train_inputs(e)]


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    return Outputs(outs=[f"{d}/model.pt", *family(e.family).train_outs(e)], files=[f"{d}/train.json"],
                   plots=[f"{d}/train_log.csv"], records=[f"{d}/train_timing.json"])


def fingerprint(e: Experiment) -> str:
    """Hash of the params that define this run's training (its reads less NOT_FINGERPRINTED): a resume state saved
    under another fingerprint is never continued."""
    vals = values(e.params, [k for k in reads(e) if k not in NOT_FINGERPRINTED])
    for key in NOT_FINGERPRINTED:
        section, _, name = key.partition(".")
        if isinstance(vals.get(section), dict):
            vals[section].pop(name, None)
    payload = {"run": e.run, "strategy": e.strategy, "positions": e.positions, "params": vals}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run(e: Experiment, progress: bool = True) -> str:
    from ..distributed import setup
    from ..io import save_csv, save_json
    from ..runtime import configure

    dev, rank, world = setup(configure(e.params.runtime))
    log_path = e.run_dir / "train_log.csv"
    done = family(e.family).train(e, dev, rank, world, fingerprint(e), progress,
                                  on_log=lambda log: save_csv(log_path, log))
    if done is None:  # ranks other than 0
        return ""
    save_csv(log_path, done.log)
    save_json(e.run_dir / "train.json", done.summary)
    save_json(e.run_dir / "train_timing.json", done.timing)
    return done.message


def _trains(e: Experiment) -> bool:
    """A milestone experiment reads another run's model: it has no training of its own."""
    return e.trains


STAGE = Stage(name="train", doc="one run's model", reads=reads, inputs=inputs, outputs=outputs, run=run, per_run=True,
              launched=True, applies=_trains, family_methods=("train",),
              resumes="the last saved state (.resume/state.pt in the run directory)")
