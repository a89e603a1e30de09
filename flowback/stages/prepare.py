"""Stage `prepare`: the data set as verified WebDataset shards in `{data.root}/{data.dataset}`.

- digits (the embedded default): scikit-learn's digits, upsampled, split by data.val_fraction (seeded by `seed`).
- imagenet, data.format png: ImageNet from data.source, cropped to data.image_size (data.resize), decoded in
  data.workers processes.
- data.format latent: VAE latents (flowback.data.latents.encode_dataset; on several GPUs: `torchrun --nproc_per_node
  8 -m flowback stage prepare`, each rank encoding every 8th shard).

Every shard is read back against the manifest at the end. Resumable: a re-run after a crash rewrites only what is
missing or damaged.
"""

from __future__ import annotations

from pathlib import Path

from ..data.manifest import MANIFEST
from ..params import Params
from . import RUNTIME, Outputs, Stage



def reads(p: Params) -> list[str]:
    keys = ["data"]
    if p.data.dataset == "digits":
        keys += ["seed"]
    if p.data.format == "latent":
        keys += ["model.latent", *RUNTIME]
    return keys


def inputs(p: Params) -> list[str]:
    return []


def outputs(p: Params) -> Outputs:
    return Outputs(outs=[str(p.data.dir)])


def marker(p: Params) -> str:
    """The file whose presence says the stage finished (snakemake's view of the directory)."""
    return str(p.data.dir / MANIFEST)


def report(summary: dict, directory: Path) -> str:
    lines = []
    for split, s in summary.items():
        skipped = f", {s['skipped']} undecodable sources skipped" if s["skipped"] else ""
        classes = s["per_class"] if len(s["per_class"]) <= 20 else f"{min(s['per_class'])}..{max(s['per_class'])}"
        lines.append(f"prepare: {split}: {s['count']} samples in {s['shards']} shards{skipped}, per class {classes} "
                     f"-> {directory}")
    return "\n".join(lines)


def run(p: Params, progress: bool = True) -> str:
    from ..data.manifest import prepared_settings, verify, write_manifest

    d = p.data
    directory = Path(d.dir)
    if d.format == "latent":
        from ..data.latents import encode_dataset

        return report(encode_dataset(p, show_progress=progress), directory)
    # The old manifest no longer describes the shards once we start rewriting them: drop it first, so a crash
    # leaves "no manifest, run prepare" rather than a manifest pointing at other data.
    (directory / MANIFEST).unlink(missing_ok=True)
    if d.dataset == "digits":
        from ..data.digits import load_digits_images, stratified_split
        from ..data.writer import write_split

        images, labels = load_digits_images(d.image_size)
        train_idx, val_idx = stratified_split(labels, d.val_fraction, p.seed)
        splits = {split: write_split(directory, split, images[idx], labels[idx], d.shard_size,
                                     show_progress=progress, num_classes=d.num_classes)
                  for split, idx in (("train", train_idx), ("val", val_idx))}
        extra = {"shard_size": d.shard_size}
    else:
        import os

        from ..data.imagenet import write_imagenet_split
        from ..data.sources import list_imagenet

        wnids, refs = list_imagenet(d.source, d.num_classes, d.max_per_class)
        splits = {split: write_imagenet_split(directory, split, r, image_size=d.image_size, resize=d.resize,
                                              shard_size=d.shard_size, num_classes=d.num_classes,
                                              workers=d.workers or len(os.sched_getaffinity(0)),
                                              skip_undecodable=d.skip_undecodable, show_progress=progress)
                  for split, r in refs.items()}
        extra = {"shard_size": d.shard_size, "source": str(d.source), "wnids": wnids}
    write_manifest(directory, {**prepared_settings(p), **extra, "splits": splits})
    return report(verify(directory), directory)


STAGE = Stage(name="prepare", doc="the data set as verified WebDataset shards", reads=reads, outputs=outputs, run=run, inputs=inputs,
              resumes="the finished shards")
