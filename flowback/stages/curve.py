"""Stage `curve`: FID over training for one run (R-REPA Figure 5 right: "accelerates training convergence by 3.3x").

The run's models saved at train.milestones and its final model each draw curve.count samples (curve.seed's noise) at
one guidance scale (curve.scale: a number, or best = the run's sweep choice) and are scored. Writes
results/runs/<run>/curve.csv (step, FID, ...: a DVC plot, and the table stage's fid_curve.png) and curve.json (DVC
metric: the FID at each step). Sampling and metrics only: no training of its own.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..families import family
from ..params import Experiment, milestone_path
from . import RUNTIME, Outputs, Stage
from .evaluate import METRIC_KEYS
from .sample import swept



def applies(e: Experiment) -> bool:
    return e.trains and family(e.family).saves_milestones and bool(e.params.train.milestones)


def _by_best(e: Experiment) -> bool:
    return e.params.curve.scale == "best" and swept(e)


def reads(e: Experiment) -> list[str]:
    guided = ["sweep.scales"] if family(e.family).has_guidance else []
    return [*e.source_keys, "results", "curve", "train.milestones", "train.steps", *guided, *RUNTIME,
            *family(e.family).sample_reads(e), *METRIC_KEYS, *data_reads(e.params)]


def _models(e: Experiment) -> dict[int, str]:
    """{training step: checkpoint}: the milestones, then the final model."""
    return {**{m: str(milestone_path(e.run_dir, m)) for m in e.params.train.milestones},
            e.params.train.steps: str(e.checkpoint)}


def inputs(e: Experiment) -> list[str]:
    from ..metrics.reference_files import reference_path

    p = e.params
    return [*_models(e).values(), *family(e.family).sample_inputs(e), str(p.data.dir),
            f"{p.metrics.dir}/model.safetensors", str(reference_path(p).parent)] + (
        [f"{e.run_dir}/sweep.json"] if _by_best(e) else [])


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    return Outputs(files=[f"{d}/curve.json"], plots=[f"{d}/curve.csv"], plot_axes={f"{d}/curve.csv": ("step", "fid")})


def run(e: Experiment, progress: bool = True) -> str:
    import shutil
    from pathlib import Path

    import numpy as np

    from ..data.images import nhwc_to_nchw
    from ..distributed import setup
    from ..io import load_json, save_csv, save_json
    from ..metrics.evaluation import Scorer
    from ..runtime import configure

    p, cp = e.params, e.params.curve
    dev, rank, _ = setup(configure(p.runtime))
    scale = cp.scale if cp.scale != "best" else (
        load_json(e.run_dir / "sweep.json")["best_scale"] if swept(e) else None)
    score = Scorer.load(p, dev) if rank == 0 else None
    rows = []
    for step, path in sorted(_models(e).items()):
        chunks = f"curve_chunks/{step}"
        drawn = family(e.family).sample(e, dev, rank, progress, guidance_weight=scale, count=cp.count or
                                        p.samples_per_run, seed=cp.seed, chunks=chunks, checkpoint=Path(path))
        if drawn is None:  # ranks other than 0
            continue
        m = score(np.ascontiguousarray(nhwc_to_nchw(drawn.images)), drawn.labels, progress)
        rows.append({"step": step, **{k: m[k] for k in ("fid", "sfid", "is", "precision", "recall", "cond_acc")}})
        shutil.rmtree(e.run_dir / chunks, ignore_errors=True)
    if rank != 0:
        return ""
    save_csv(e.run_dir / "curve.csv", rows)
    save_json(e.run_dir / "curve.json", {"scale": scale, "fid": {str(r["step"]): r["fid"] for r in rows}})
    shutil.rmtree(e.run_dir / "curve_chunks", ignore_errors=True)
    return f"{e.run}: FID by training step " + ", ".join(f"{r['step']}: {r['fid']:.2f}" for r in rows)


STAGE = Stage(name="curve", doc="one run's FID over training (its milestones and final model)", reads=reads,
              inputs=inputs, outputs=outputs, run=run, per_run=True, launched=True, switch="curve.enabled", applies=applies,
              resumes="the finished chunks of each model (curve_chunks/ in the run directory)",
              family_methods=("sample",))
