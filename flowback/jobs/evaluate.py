"""Stage `evaluate`: FID, sFID, IS, precision/recall and class fidelity of one run's samples, and its classifier.

Writes results/runs/<run>/metrics.json (science only; DVC metrics). The reference side of the metrics is read from
`{metrics.dir}/reference/<name>.npz` (the `reference` stage); a missing file, or one computed with another metric
network, data or settings, is an error naming it. `cond_acc` is the metric network's accuracy at recognising each
sample's conditioning class (classification accuracy score; when the network's classes are the data set's).
Latent mode (model.latent): samples.npz holds VAE-decoded pixels, so the generative metrics are computed the same
way; the classifier reads the latent shards' posterior means.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Experiment
from . import FLOW_KEYS, RUNTIME, Outputs

PER_RUN = True
LAUNCHED = False
METRIC_KEYS = ["metrics.network", "metrics.dir", "metrics.batch_size", "metrics.isc_splits", "metrics.isc_split_size",
               "metrics.prc_neighborhood", "metrics.classifier_split", "metrics.classifier_batch_size", "metrics.reference_split",
               "metrics.reference_batch"]


def reads(e: Experiment) -> list[str]:
    if e.family == "af":  # no likelihood, so no training-free classifier: the generative metrics only
        keys = [k for k in METRIC_KEYS if "classifier" not in k]
        return [*e.source_keys, "results", *keys, *RUNTIME, *data_reads(e.params)]
    return [*e.source_keys, "results", *METRIC_KEYS, *FLOW_KEYS, *RUNTIME, "runtime.gpu_memory_gib",
            *data_reads(e.params)]


def inputs(e: Experiment) -> list[str]:
    from ..metrics.reference import reference_path

    p = e.params
    return [str(p.data.dir), f"{p.metrics.dir}/model.safetensors", str(reference_path(p).parent),
            str(e.checkpoint), f"{e.run_dir}/samples.npz"]


def outputs(e: Experiment) -> Outputs:
    return Outputs(metrics=[f"{e.run_dir}/metrics.json"])


def run(e: Experiment, progress: bool = True) -> str:
    from ..builders import flow_config
    from ..checkpoints import load_flow
    from ..io import save_json
    from ..metrics.classifier import classifier_accuracy, classifier_inputs
    from ..metrics.generative import (conditional_accuracy, extract_features, isc_split_count, load_feature_network,
                                      load_samples)
    from ..metrics.reference import load_reference, reference_fingerprint, reference_path
    from ..plan.classifier import resolve_classifier_batch
    from ..runtime import configure

    p, mp = e.params, e.params.metrics
    dev = configure(p.runtime)
    run_dir = e.run_dir
    net = load_feature_network(mp.network, mp.dir).to(dev)
    ref = load_reference(reference_path(p), expected=lambda: reference_fingerprint(p, net))
    samples, labels = load_samples(run_dir / "samples.npz", p.data.channels, p.data.image_size)
    feats = extract_features(net, samples, mp.batch_size, device=dev, show_progress=progress)
    splits = isc_split_count(len(samples), mp.isc_splits, mp.isc_split_size)
    metrics = ref.metrics(feats, isc_splits=splits, prc_neighborhood=mp.prc_neighborhood)
    same_classes = getattr(net, "num_classes", None) == p.data.num_classes
    metrics["cond_acc"] = (100.0 * conditional_accuracy(feats["logits"], labels)
                           if labels is not None and same_classes else None)

    metrics["acc"] = None  # an adversarial flow has no likelihood: no training-free classifier
    if e.family != "af":
        model, _ = load_flow(e.checkpoint, expected=flow_config(p), device=dev)
        inputs_, targets = classifier_inputs(p, mp.classifier_split)
        batch = resolve_classifier_batch(e, dev)
        metrics["acc"] = 100.0 * classifier_accuracy(model, inputs_, targets, batch, show_progress=progress)
    metrics.update(num_samples=int(len(samples)), isc_splits=splits, reference=ref.source, network=mp.network)
    save_json(run_dir / "metrics.json", metrics)
    cond = f"  Cond. acc {metrics['cond_acc']:.1f}%" if metrics["cond_acc"] is not None else ""
    return (f"{e.run}: FID {metrics['fid']:.2f}  sFID {metrics['sfid']:.2f}  IS {metrics['is']:.2f}  "
            f"P {metrics['precision']:.3f}  R {metrics['recall']:.3f}{cond}"
            + (f"  Acc {metrics['acc']:.2f}%" if metrics["acc"] is not None else ""))
