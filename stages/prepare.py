"""Stage `prepare`: write the data set as verified WebDataset shards.

    python -m stages.prepare [--params params.yaml] [--quiet]

Writes `{data.dir}/{train,val}-NNNNNN.tar` and `{data.dir}/manifest.json`, then reads every shard back (sha256,
counts, decoding). Resumable: re-running after a crash rewrites only what is missing or damaged. Other stages load
the result with `flowback.data.shards.load_split(params, split)`.

- data.dataset digits: the embedded default (scikit-learn's digits, split by val_fraction).
- data.dataset imagenet, data.format png: ImageNet from data.source, cropped to data.image_size (data.resize),
  decoded in data.workers processes.
- data.format latent: the VAE `encode` step (stages/encode.py; multi-GPU with torchrun).
"""

from __future__ import annotations

import os
from pathlib import Path

from flowback.data.shards import MANIFEST, prepared_settings, verify, write_manifest, write_split
from flowback.params import Params
from flowback.stage import run_stage


def prepare(params: Params, show_progress: bool = True) -> dict:
    """Write both splits and the manifest of `params.data`, verify them; returns verify()'s summary."""
    d = params.data
    directory = Path(d.dir)
    if d.dataset == "digits":
        from flowback.data.digits import load_digits_images, stratified_split

        images, labels = load_digits_images(d.image_size)
        train_idx, val_idx = stratified_split(labels, d.val_fraction, params.seed)
        # The old manifest no longer describes the shards once we start rewriting them: drop it first, so a crash
        # leaves "no manifest, run prepare" rather than a manifest pointing at other data.
        (directory / MANIFEST).unlink(missing_ok=True)
        splits = {split: write_split(directory, split, images[idx], labels[idx], d.shard_size,
                                     show_progress=show_progress, num_classes=d.num_classes)
                  for split, idx in (("train", train_idx), ("val", val_idx))}
        extra = {"shard_size": d.shard_size}
    elif d.format == "png":
        from flowback.data.imagenet import write_imagenet_split
        from flowback.data.sources import list_imagenet

        wnids, refs = list_imagenet(d.source, d.num_classes, d.max_per_class)
        (directory / MANIFEST).unlink(missing_ok=True)
        splits = {split: write_imagenet_split(directory, split, r, image_size=d.image_size, resize=d.resize,
                                              shard_size=d.shard_size, num_classes=d.num_classes,
                                              workers=d.workers or len(os.sched_getaffinity(0)),
                                              skip_undecodable=d.skip_undecodable, show_progress=show_progress)
                  for split, r in refs.items()}
        extra = {"shard_size": d.shard_size, "source": str(d.source), "wnids": wnids}
    else:
        from stages.encode import encode

        return encode(params, show_progress=show_progress)
    write_manifest(directory, {**prepared_settings(params), **extra, "splits": splits})
    return verify(directory)


def report(params: Params, summary: dict) -> None:
    for split, s in summary.items():
        skipped = f", {s['skipped']} undecodable sources skipped" if s["skipped"] else ""
        classes = s["per_class"] if len(s["per_class"]) <= 20 else f"{min(s['per_class'])}..{max(s['per_class'])}"
        print(f"prepare: {split}: {s['count']} samples in {s['shards']} shards{skipped}, per class {classes} "
              f"-> {params.data.dir}")


def body(params: Params, _exp, args) -> None:
    report(params, prepare(params, show_progress=not args.quiet))


def main(argv: list[str] | None = None) -> None:
    """Exits 2 with a one-line message (no traceback) on a FlowBackError (bad params, bad or damaged files)."""
    run_stage("prepare", body, argv)


if __name__ == "__main__":
    main()
