"""Stage `encoder`: the frozen alignment encoder in `encoder.dir`.

The default profile trains a tiny DINOv2-architecture ViT on the training split (`encoder.train`); the paper profiles
set `encoder.train: null` and get DINOv2 from `flowback weights fetch`, and this stage only checks that it loads and
runs, so its outputs persist (DVC must not delete fetched weights before the stage runs).
"""

from __future__ import annotations

from ..data.manifest import data_reads
from ..params import Params
from . import RUNTIME, Outputs, Stage



def reads(p: Params) -> list[str]:
    return ["encoder", *RUNTIME] + (data_reads(p) if p.encoder.train is not None else [])


def inputs(p: Params) -> list[str]:
    return [str(p.data.dir)] if p.encoder.train is not None else []


def outputs(p: Params) -> Outputs:
    d = p.encoder.dir
    weights = [f"{d}/model.safetensors", f"{d}/config.json"]
    if p.encoder.train is None:  # fetched weights the stage only checks: they must survive a rerun
        return Outputs(persist=weights, files=[f"{d}/metrics.json"])
    return Outputs(outs=weights, files=[f"{d}/metrics.json"])


def run(p: Params, progress: bool = True) -> str:
    import time

    import torch

    from ..alignment.encoder import EncoderConfig, load_encoder, save_encoder
    from ..alignment.pretrain import class_variance_fraction, patch_features, probe_accuracy, train_encoder
    from ..data.manifest import load_split
    from ..io import save_json
    from ..runtime import configure

    configure(p.runtime)
    ep, cfg = p.encoder, EncoderConfig.of(p.encoder)
    if ep.train is None:  # fetched (`flowback weights fetch`): check it loads and runs, record what it is
        enc = load_encoder(ep.dir, allow_hub=False)
        x = torch.zeros(1, enc.in_chans, enc.cfg.input_size, enc.cfg.input_size)
        grid = enc(x).shape[1]
        save_json(f"{ep.dir}/metrics.json", {"source": ep.hub or ep.arch, "dim": enc.dim, "grid": grid})
        return f"encoder {enc.cfg.arch} loads from {ep.dir}: {grid}x{grid} patches of {enc.dim}-d features"
    images, labels = (torch.from_numpy(a) for a in load_split(p, "train"))
    val_images, val_labels = (torch.from_numpy(a) for a in load_split(p, "val"))
    t0 = time.perf_counter()
    t = ep.train
    net, head = train_encoder(images, labels, cfg, p.data.num_classes, t.steps, t.batch_size, t.lr, t.seed,
                              show_progress=progress, objective=t.objective, temperature=t.temperature)
    seconds = time.perf_counter() - t0
    save_encoder(net, cfg, ep.dir)
    report = {"train_acc": probe_accuracy(net, head, cfg, images, labels),
              "val_acc": probe_accuracy(net, head, cfg, val_images, val_labels), "steps": t.steps,
              "objective": t.objective,
              # how much of the patch features' variance the class explains (val): what alignment would inject
              "class_variance": class_variance_fraction(patch_features(net, cfg, val_images), val_labels)}
    save_json(f"{ep.dir}/metrics.json", report)
    return (f"encoder {cfg.arch}: probe accuracy train {report['train_acc']:.3f}, val {report['val_acc']:.3f} "
            f"({seconds:.0f} s)")


STAGE = Stage(name="encoder", doc="the frozen alignment encoder (trained on the digits, or fetched and checked)", reads=reads, outputs=outputs, run=run, inputs=inputs)
