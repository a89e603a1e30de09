"""Stage `metricnet`: the metric feature network every later stage loads from `{metrics.dir}/model.safetensors`.

    python -m stages.metricnet [--params params.yaml] [--quiet]

- digitnet (the default profile): trained on the real training images; writes model.safetensors, config.json and
  metrics.json {"train_acc", "val_acc", "steps", "seconds"}.
- inception (paper profiles): converts the file `flowback weights fetch` put in metrics.dir (loaded with
  weights_only=True) to model.safetensors, checks it runs, and writes config.json and metrics.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from flowback.io import save_json
from flowback.metrics.digitnet import accuracy, save_digitnet, train_digitnet
from flowback.params import ParamsError, TrainSpec
from flowback.stage import run_stage

REPORT_FILE = "metrics.json"


def load_splits(params) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (val images, labels)) from the data stage's shards, prepared with these params."""
    from flowback.data.shards import load_split

    return load_split(params, "train"), load_split(params, "val")


def train_metricnet(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], spec: TrainSpec,
                    num_classes: int, directory: str | Path, show_progress: bool = True) -> dict:
    """Train, save to `directory`, and write the accuracy report there; returns the report."""
    start = time.perf_counter()
    net = train_digitnet(train[0], train[1], steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                         seed=spec.seed, show_progress=show_progress, num_classes=num_classes)
    seconds = time.perf_counter() - start
    save_digitnet(net, directory)
    report = {"train_acc": accuracy(net, *train), "val_acc": accuracy(net, *val), "steps": spec.steps,
              "seconds": round(seconds, 3)}
    save_json(Path(directory) / REPORT_FILE, report)
    return report


def body(params, _exp, args) -> None:
    m = params.metrics
    if m.network == "inception":
        import torch

        from flowback.metrics.inception import FEATURE_DIMS, load_inception, save_for_pipeline

        path = save_for_pipeline(m.dir)
        feats = load_inception(m.dir).features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        dims = {k: int(v.shape[1]) for k, v in feats.items()}
        if dims != FEATURE_DIMS:
            raise ParamsError(f"metrics.dir: {path} gives features {dims}, expected {FEATURE_DIMS}")
        save_json(Path(m.dir) / REPORT_FILE, {"network": "inception", "feature_dims": dims})
        print(f"metricnet: Inception-v3 (torch-fidelity) ready in {path}: features {dims}")
        return
    if m.network != "digitnet" or m.train is None:
        raise ParamsError(f"metrics: this profile does not train its metric network (network = {m.network!r}, "
                          f"train = {m.train}); it must provide the network's weights in metrics.dir = {m.dir!r}, "
                          f"and this stage must not run")
    train, val = load_splits(params)
    report = train_metricnet(train, val, m.train, params.data.num_classes, m.dir, show_progress=not args.quiet)
    print(f"metricnet: train_acc {report['train_acc']:.4f}  val_acc {report['val_acc']:.4f}  "
          f"({report['steps']} steps, {report['seconds']:.1f} s) -> {m.dir}")


def main(argv: list[str] | None = None) -> None:
    """Exits 2 with a one-line message (no traceback) on bad params or missing/damaged data files."""
    run_stage("metricnet", body, argv)


if __name__ == "__main__":
    main()
