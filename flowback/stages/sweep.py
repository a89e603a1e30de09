"""Stage `sweep`: the classifier-free guidance sweep of one run (R-REPA sec. 5 and Figure 5 left: "we report results
at the optimal CFG scale for each model, determined via a grid search").

For each scale in sweep.scales the run's model draws sweep.count samples (with sweep.seed's noise, not sample.seed's)
and they are scored by FID (and the rest of the metrics) against the reference. Writes results/runs/<run>/sweep.json
(DVC metric: the best scale by FID, its FID, and the unguided FID when 0 is on the grid) and sweep.csv (every scale's
metrics: a DVC plot, and the table stage's cfg_sweep.png). The sample stage then draws the reported row at the best
scale, so the sweep costs sampling and metrics only, on the one trained model. Resumable per scale (chunk files).
Under torchrun every rank draws its share of each scale's chunks; rank 0 scores.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..families import family
from ..params import Experiment
from . import RUNTIME, Outputs, Stage
from .evaluate import METRIC_KEYS



def applies(e: Experiment) -> bool:
    return family(e.family).has_guidance and bool(e.params.sweep.scales)


def reads(e: Experiment) -> list[str]:
    return [*e.source_keys, "results", "sweep", *RUNTIME, *family(e.family).sample_reads(e), *METRIC_KEYS,
            *data_reads(e.params)]


def inputs(e: Experiment) -> list[str]:
    from ..metrics.reference_files import reference_path

    p = e.params
    return [str(e.checkpoint), *family(e.family).sample_inputs(e), str(p.data.dir),
            f"{p.metrics.dir}/model.safetensors", str(reference_path(p).parent)]


def outputs(e: Experiment) -> Outputs:
    d = e.run_dir
    return Outputs(files=[f"{d}/sweep.json"], plots=[f"{d}/sweep.csv"], plot_axes={f"{d}/sweep.csv": ("scale", "fid")},
                   records=[f"{d}/sweep_timing.json"])


def run(e: Experiment, progress: bool = True) -> str:
    import shutil

    import numpy as np

    from ..data.images import nhwc_to_nchw
    from ..distributed import setup
    from ..io import save_csv, save_json
    from ..metrics.evaluation import Scorer
    from ..runtime import configure

    p, sw = e.params, e.params.sweep
    dev, rank, _ = setup(configure(p.runtime))
    score = Scorer.load(p, dev) if rank == 0 else None
    rows, seconds = [], 0.0
    for w in sw.scales:
        chunks = f"sweep_chunks/{w:g}"
        drawn = family(e.family).sample(e, dev, rank, progress, guidance_weight=w, count=sw.count or
                                        p.samples_per_run, seed=sw.seed, chunks=chunks)
        if drawn is None:  # ranks other than 0
            continue
        m = score(np.ascontiguousarray(nhwc_to_nchw(drawn.images)), drawn.labels, progress)
        rows.append({"scale": w, **{k: m[k] for k in ("fid", "sfid", "is", "precision", "recall", "cond_acc")}})
        seconds += drawn.timing["seconds"]
        shutil.rmtree(e.run_dir / chunks, ignore_errors=True)
    if rank != 0:
        return ""
    best = min(rows, key=lambda r: (r["fid"], r["scale"]))
    unguided = next((r["fid"] for r in rows if r["scale"] == 0), None)
    save_csv(e.run_dir / "sweep.csv", rows)
    save_json(e.run_dir / "sweep.json", {"best_scale": best["scale"], "best_fid": best["fid"], "fid_unguided": unguided,
                                         "count": sw.count or p.samples_per_run})
    save_json(e.run_dir / "sweep_timing.json", {"seconds": seconds})
    shutil.rmtree(e.run_dir / "sweep_chunks", ignore_errors=True)
    grid = ", ".join(f"{r['scale']:g}: {r['fid']:.2f}" for r in rows)
    return f"{e.run}: FID by guidance scale {grid}; best {best['scale']:g}"


STAGE = Stage(name="sweep", doc="one run's guidance sweep (FID per scale, the best scale)", reads=reads, inputs=inputs,
              outputs=outputs, run=run, per_run=True, launched=True, switch="sweep.scales", applies=applies,
              resumes="the finished chunks of each scale (sweep_chunks/ in the run directory)",
              family_methods=("sample",))
