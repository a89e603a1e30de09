"""Stage `encoder`: train the default profile's frozen alignment encoder (a tiny DINOv2-family timm ViT).

Paper profiles set `encoder.train: null` and get DINOv2 from `flowback weights fetch`; then this stage only checks
that the weights load.
"""

from __future__ import annotations

import time

import torch

from flowback.alignment import load_encoder, save_encoder
from flowback.alignment.pretrain import probe_accuracy, train_encoder
from flowback.builders import encoder_config
from flowback.data.shards import load_split
from flowback.io import save_json
from flowback.stage import run_stage


def body(params, _exp, args):
    ep, cfg = params.encoder, encoder_config(params.encoder)
    if ep.train is None:  # fetched (`flowback weights fetch`): check it loads and runs, record what it is
        enc = load_encoder(ep.dir, allow_hub=False)
        x = torch.zeros(1, enc.in_chans, enc.cfg.input_size, enc.cfg.input_size)
        grid = enc(x).shape[1]
        save_json(f"{ep.dir}/metrics.json", {"source": ep.hub or ep.arch, "dim": enc.dim, "grid": grid})
        print(f"encoder {enc.cfg.arch} loads from {ep.dir}: {grid}x{grid} patches of {enc.dim}-d features")
        return
    images, labels = (torch.from_numpy(a) for a in load_split(params, "train"))
    val_images, val_labels = (torch.from_numpy(a) for a in load_split(params, "val"))
    t0 = time.perf_counter()
    net, head = train_encoder(images, labels, cfg, params.data.num_classes, ep.train.steps, ep.train.batch_size,
                              ep.train.lr, ep.train.seed, show_progress=not args.quiet)
    seconds = time.perf_counter() - t0
    save_encoder(net, cfg, ep.dir)
    report = {"train_acc": probe_accuracy(net, head, cfg, images, labels),
              "val_acc": probe_accuracy(net, head, cfg, val_images, val_labels),
              "steps": ep.train.steps, "seconds": seconds}
    save_json(f"{ep.dir}/metrics.json", report)
    print(f"encoder {cfg.arch}: probe accuracy train {report['train_acc']:.3f}, val {report['val_acc']:.3f} "
          f"({seconds:.0f} s)")


def main(argv=None):
    run_stage("encoder", body, argv)


if __name__ == "__main__":
    main()
