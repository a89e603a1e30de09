"""Stage `calibrate`: what the metrics give real images, so a table of samples can be read against them.

- real: the `metrics.calibration.split` images (held out from training: the val split) scored exactly as a run's
  samples are (FID, sFID, IS, precision/recall against the reference; Cond. acc. with their true labels). A model
  whose samples beat this row on FID is closer to the reference set than unseen real data is: with the train split as
  the reference, that is memorisation, not quality.
- split-half floor: the FID between two disjoint random halves of the reference split, `metrics.calibration.halves`
  times: what sampling noise alone gives at that sample size.

Writes results/calibration.json (a DVC metric), which the table shows as its first rows. One stage for the whole grid.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Params
from . import RUNTIME, Outputs, Stage
from .evaluate import METRIC_KEYS



def reads(p: Params) -> list[str]:
    return ["results", "metrics.calibration", *METRIC_KEYS, *RUNTIME, *data_reads(p)]


def inputs(p: Params) -> list[str]:
    from ..metrics.reference_files import reference_path

    return [str(p.data.dir), f"{p.metrics.dir}/model.safetensors", str(reference_path(p).parent)]


def outputs(p: Params) -> Outputs:
    return Outputs(files=[str(p.results_dir / "calibration.json")])


def run(p: Params, progress: bool = True) -> str:
    import numpy as np

    from ..data.manifest import load_split
    from ..io import save_json
    from ..metrics.evaluation import Scorer
    from ..metrics.frechet import frechet_distance, gaussian_stats
    from ..metrics.generative import extract_features
    from ..runtime import configure

    c = p.metrics.calibration
    dev = configure(p.runtime)
    score = Scorer.load(p, dev)
    images, labels = load_split(p, c.split)
    real = score(images, labels, progress)
    ref_images, _ = load_split(p, p.metrics.reference_split)
    pool = extract_features(score.net, ref_images, p.metrics.batch_size, device=dev, show_progress=progress)["pool"]
    halves = []
    for k in range(c.halves):
        order = np.random.default_rng([c.seed, k]).permutation(len(pool))
        a, b = order[: len(order) // 2], order[len(order) // 2:]
        halves.append(float(frechet_distance(*gaussian_stats(pool[a]), *gaussian_stats(pool[b]))))
    out = {"real": {"split": c.split, **{k: real[k] for k in ("fid", "sfid", "is", "precision", "recall",
                                                               "cond_acc", "num_samples")}},
           "split_half_fid": {"mean": float(np.mean(halves)), "std": float(np.std(halves, ddof=1)) if len(halves) > 1
                              else None, "halves": halves, "size": len(pool) // 2}}
    save_json(p.results_dir / "calibration.json", out)
    return (f"calibrate: real {c.split} images FID {real['fid']:.2f}, IS {real['is']:.2f}, Cond. acc. "
            f"{real['cond_acc'] if real['cond_acc'] is None else round(real['cond_acc'], 1)}%; split-half floor "
            f"FID {np.mean(halves):.2f} over {c.halves} halvings of {len(pool)} images")


STAGE = Stage(name="calibrate", doc="the metrics of real held-out images and the split-half floor", reads=reads,
              inputs=inputs, outputs=outputs, run=run, switch="metrics.calibration.enabled")
