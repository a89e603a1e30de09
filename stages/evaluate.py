"""Stage `evaluate`: FID, sFID, IS, precision/recall of one experiment's samples and its classifier accuracy.

Writes results/runs/<experiment>/metrics.json (tracked by DVC as metrics). The reference side of the metrics is read
from `{metrics.dir}/reference/<name>.npz`, which `python -m stages.reference` computes once for all experiments; a
missing file, or one computed with another metric network, data or settings, is an error naming it.
Latent mode (model.latent): samples.npz holds VAE-decoded pixels, so the generative metrics are computed the same
way (against an ADM reference batch, or a split whose latent shards keep their pixels); the classifier reads the
latent shards' posterior means.
"""

from __future__ import annotations

import numpy as np

from flowback.builders import device as pick_device, flow_config, set_threads
from flowback.checkpoints import load_flow
from flowback.data.images import nhwc_to_nchw
from flowback.io import FlowBackFileError, load_npz, save_json
from flowback.metrics.classifier import classifier_accuracy, classifier_inputs
from flowback.metrics.generative import extract_features, load_feature_network
from flowback.metrics.reference import load_reference, reference_fingerprint, reference_path
from flowback.stage import run_stage


def load_samples(path, channels: int, size: int) -> np.ndarray:
    data = load_npz(path)
    if "arr_0" not in data:
        raise FlowBackFileError(f"{path}: no arr_0 (ADM format: uint8 NHWC images in arr_0)")
    x = data["arr_0"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, channels):
        raise FlowBackFileError(f"{path}: expected uint8 images of shape (N, {size}, {size}, {channels}), "
                                f"got {x.dtype} {x.shape}")
    return np.ascontiguousarray(nhwc_to_nchw(x))


def body(params, exp, args):
    p = exp.params
    mp = p.metrics
    set_threads(p.train.threads)
    dev = pick_device(p.sample.device)
    run_dir = params.run_dir(exp.name)
    show = not args.quiet
    net = load_feature_network(mp.network, mp.dir).to(dev)
    ref = load_reference(reference_path(p), expected=lambda: reference_fingerprint(p, net))
    samples = load_samples(run_dir / "samples.npz", p.data.channels, p.data.image_size)
    feats = extract_features(net, samples, mp.batch_size, device=dev, show_progress=show)
    metrics = ref.metrics(feats, isc_splits=mp.isc_splits, prc_neighborhood=mp.prc_neighborhood)

    model, _ = load_flow(run_dir / "model.pt", expected=flow_config(p), device=dev)
    inputs, labels = classifier_inputs(p, mp.classifier_split)
    metrics["acc"] = 100.0 * classifier_accuracy(model, inputs, labels, mp.classifier_batch_size, show_progress=show)
    metrics.update(num_samples=int(len(samples)), reference=ref.source, network=mp.network)
    save_json(run_dir / "metrics.json", metrics)
    print(f"{exp.name}: FID {metrics['fid']:.2f}  sFID {metrics['sfid']:.2f}  IS {metrics['is']:.2f}  "
          f"P {metrics['precision']:.3f}  R {metrics['recall']:.3f}  Acc {metrics['acc']:.2f}%")


def main(argv=None):
    run_stage("evaluate", body, argv, per_experiment=True)


if __name__ == "__main__":
    main()
