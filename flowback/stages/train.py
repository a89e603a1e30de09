"""Stage `train`: train one run of the grid (an experiment at one training seed) on the train split.

    python -m flowback stage train baseline-s0
    torchrun --nproc_per_node 8 -m flowback stage train baseline-s0      # DDP, one GPU per rank

Outputs in results/runs/<run>/: model.pt (config + weights, the EMA ones when train.ema_decay > 0, and which in its
meta), train.json (final losses: science), the curves twice, both rewritten at every log step so a live run can be
followed, and, not tracked, train_timing.json (seconds, images/s, the step plan):
- dvclive/ (flowback/live.py): one `<field>.tsv` per curve (the family's log fields: a flow's loss, bpd, align, lr,
  grad_norm, and val_bpd when train.val_every > 0; the adversarial flow's d_loss, g_loss, ot) and metrics.json (the
  latest values). The tsv files are `plots` (kept in git; dvc.yaml's top-level plots draw one line per run in each
  field's figure) and metrics.json is a metric beside train.json, so `dvc plots show`, `dvc exp show` and `dvc metrics
  diff` read them. They hold no timestamps: a re-run rewrites them byte for byte, dvc.lock stays put and git stays
  clean.
- train_log.csv: every column of the log in one file (kept in git, not a plot): what the table stage draws
  training_curves.png from.
A killed run resumes from results/runs/<run>/.resume/state.pt when that state was saved under the same fingerprint: the
params this stage reads, less those that only say how the steps are computed or when they are measured
(NOT_FINGERPRINTED). The log travels in that state, so a resumed run's curves equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json

from .. import live
from ..families import family
from ..params import Experiment, values
from . import RUNTIME, Outputs, Stage

# how the steps are computed, not what they compute: changing one mid-run keeps the resume state
NOT_FINGERPRINTED = ("train.micro_batch", "train.checkpointing", "train.compile", "train.workers", "train.log_every",
                     "train.val_every", "train.val_images", "train.milestones", "runtime.device", "runtime.threads",
                     "runtime.tf32", "runtime.gpu_memory_gib")


def reads(e: Experiment) -> list[str]:
    return [f"experiments.{e.name}", "results", *RUNTIME, "runtime.gpu_memory_gib", *family(e.family).train_reads(e)]


def inputs(e: Experiment) -> list[str]:
    return [str(e.params.data.dir), *family(e.family).train_inputs(e)]


def live_fields(e: Experiment) -> tuple[str, ...]:
    """The log fields with a curve (a DVCLive file each): the family's, and validation's when it is on."""
    fam = family(e.family)
    return fam.log_fields + (("val_bpd",) if fam.has_likelihood and e.params.train.val_every else ())


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    return Outputs(outs=[f"{d}/model.pt", *family(e.family).train_outs(e)],
                   files=[f"{d}/train.json", live.metrics_file(d), f"{d}/train_log.csv"],
                   plots=[live.plot_file(d, f) for f in live_fields(e)], records=[f"{d}/train_timing.json"])


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
    curves = live.LiveLog(e.run_dir, live_fields(e)) if rank == 0 else None

    def on_log(log: list[dict]) -> None:
        save_csv(log_path, log)
        curves(log)

    done = family(e.family).train(e, dev, rank, world, fingerprint(e), progress, on_log=on_log)
    if done is None:  # ranks other than 0
        return ""
    save_csv(log_path, done.log)
    curves.end(done.log)
    save_json(e.run_dir / "train.json", done.summary)
    save_json(e.run_dir / "train_timing.json", done.timing)
    return done.message


def _trains(e: Experiment) -> bool:
    """A milestone experiment reads another run's model: it has no training of its own."""
    return e.trains


STAGE = Stage(name="train", doc="one run's model", reads=reads, inputs=inputs, outputs=outputs, run=run, per_run=True,
              launched=True, applies=_trains, family_methods=("train",),
              resumes="the last saved state (.resume/state.pt in the run directory)")
