"""Stage `metricnet`: the metric feature network every later stage loads from `{metrics.dir}/model.safetensors`.

- digitnet (the default profile): trained on the real training images; writes model.safetensors, config.json and
  metrics.json {"train_acc", "val_acc", "steps"}.
- inception (paper profiles): converts the file `flowback weights fetch` put in metrics.dir (loaded with
  weights_only=True) to model.safetensors, checks it runs, and writes config.json and metrics.json.
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Params
from . import RUNTIME, Outputs, Stage



def reads(p: Params) -> list[str]:
    keys = ["metrics.network", "metrics.dir", "metrics.train", *RUNTIME]
    return keys + (data_reads(p) if p.metrics.network == "digitnet" else [])


def inputs(p: Params) -> list[str]:
    return [str(p.data.dir)] if p.metrics.network == "digitnet" else []


def outputs(p: Params) -> Outputs:
    d = p.metrics.dir
    return Outputs(outs=[f"{d}/model.safetensors", f"{d}/config.json"], files=[f"{d}/metrics.json"])


def run(p: Params, progress: bool = True) -> str:
    from pathlib import Path

    from ..io import save_json
    from ..params import ParamsError
    from ..runtime import configure

    configure(p.runtime)
    m = p.metrics
    if m.network == "inception":
        import torch

        from ..metrics.inception import FEATURE_DIMS, load_inception, save_for_pipeline

        path = save_for_pipeline(m.dir)
        feats = load_inception(m.dir).features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        dims = {k: int(v.shape[1]) for k, v in feats.items()}
        if dims != FEATURE_DIMS:
            raise ParamsError(f"metrics.dir: {path} gives features {dims}, expected {FEATURE_DIMS}")
        save_json(Path(m.dir) / "metrics.json", {"network": "inception", "feature_dims": dims})
        return f"metricnet: Inception-v3 (torch-fidelity) ready in {path}: features {dims}"
    if m.train is None:
        raise ParamsError(f"metrics.train: the digitnet metric network is trained by this stage, so metrics.train "
                          f"must be set (or provide its weights in metrics.dir = {m.dir!r} and do not run it)")
    from ..data.manifest import load_split
    from ..metrics.digitnet import train_and_save

    report = train_and_save(load_split(p, "train"), load_split(p, "val"), m.train, p.data.num_classes, m.dir,
                            show_progress=progress)
    return (f"metricnet: train_acc {report['train_acc']:.4f}  val_acc {report['val_acc']:.4f}  "
            f"({report['steps']} steps) -> {m.dir}")


STAGE = Stage(name="metricnet", doc="the feature network of FID/sFID/IS/P/R", reads=reads, outputs=outputs, run=run, inputs=inputs)
