"""Stage `evaluate`: FID, sFID, IS, precision/recall and class fidelity of one run's samples, and its classifier.

Writes results/runs/<run>/metrics.json (results only; DVC metrics). The reference side of the metrics is read from
`{metrics.dir}/reference/<name>.npz` (the `reference` stage); a missing file, or one computed with another metric
network, data or settings, is an error naming it. `cond_acc` is the metric network's accuracy at recognising each
sample's conditioning class (when the network's classes are the data set's). A family with a likelihood also gets
the training-free classifier's accuracy (`acc`, one gradient step) and, with metrics.exhaustive_classifier, the
exhaustive one (`acc_exhaustive`, argmax_k log p(x|k)) on `metrics.classifier_split`. `weights` says which weights
drew the samples and were scored: `ema` when the run keeps an EMA (the paper evaluates those), else `raw`.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..families import family
from ..params import Experiment
from . import RUNTIME, Outputs, Stage

METRIC_KEYS = ["metrics.network", "metrics.dir", "metrics.batch_size", "metrics.isc_splits", "metrics.isc_split_size",
               "metrics.prc_neighborhood", "metrics.reference_split", "metrics.reference_batch"]


def reads(e: Experiment) -> list[str]:
    return [*e.source_keys, "results", *METRIC_KEYS, *RUNTIME, *data_reads(e.params),
            *family(e.family).classifier_reads(e)]


def inputs(e: Experiment) -> list[str]:
    from ..metrics.reference_files import reference_path

    p = e.params
    return [str(p.data.dir), f"{p.metrics.dir}/model.safetensors", str(reference_path(p).parent),
            str(e.checkpoint), f"{e.run_dir}/samples.npz", f"{e.run_dir}/sample.json"]


def outputs(e: Experiment) -> Outputs:
    return Outputs(files=[f"{e.run_dir}/metrics.json"])


def run(e: Experiment, progress: bool = True) -> str:
    from ..io import load_json, save_json
    from ..metrics.evaluation import Scorer
    from ..metrics.generative import load_samples
    from ..runtime import configure

    p = e.params
    dev = configure(p.runtime)
    score = Scorer.load(p, dev)
    samples, labels = load_samples(e.run_dir / "samples.npz", p.data.channels, p.data.image_size)
    metrics = score(samples, labels, progress)
    metrics["weights"] = load_json(e.run_dir / "sample.json").get("weights")  # ema or raw: what drew the samples
    metrics.update(family(e.family).classify(e, dev, progress))
    save_json(e.run_dir / "metrics.json", metrics)
    cond = f"  Cond. acc {metrics['cond_acc']:.1f}%" if metrics["cond_acc"] is not None else ""
    acc = f"  Acc {metrics['acc']:.2f}%" if metrics["acc"] is not None else ""
    acc += f" (exhaustive {metrics['acc_exhaustive']:.2f}%)" if metrics["acc_exhaustive"] is not None else ""
    return (f"{e.run}: FID {metrics['fid']:.2f}  sFID {metrics['sfid']:.2f}  IS {metrics['is']:.2f}  "
            f"P {metrics['precision']:.3f}  R {metrics['recall']:.3f}{cond}{acc}")


STAGE = Stage(name="evaluate", doc="one run's metrics", reads=reads, inputs=inputs, outputs=outputs, run=run,
              per_run=True, family_methods=("classify", "load"))
