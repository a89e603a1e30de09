"""Stage `prepare`: write the data set as verified WebDataset shards.

    python -m stages.prepare [--params params.yaml] [--quiet]

Writes `{data.dir}/{train,val}-NNNNNN.tar` and `{data.dir}/manifest.json`, then reads every shard back (sha256,
counts, decoding). Resumable: re-running after a crash rewrites only what is missing or damaged. Other stages load
the result with `flowback.data.shards.load_split(params, split)`.
"""

from __future__ import annotations

from pathlib import Path

from flowback.data.shards import MANIFEST, verify, write_manifest, write_split
from flowback.params import Params, ParamsError
from flowback.stage import run_stage


def prepare(params: Params, show_progress: bool = True) -> dict:
    """Write both splits and the manifest of `params.data`, verify them; returns verify()'s summary."""
    d = params.data
    if d.dataset != "digits":  # the schema allows only digits today; a new data set needs its loader here
        raise ParamsError(f"data.dataset: no loader for {d.dataset!r}")
    from flowback.data.digits import load_digits_images, stratified_split

    images, labels = load_digits_images(d.image_size)
    train_idx, val_idx = stratified_split(labels, d.val_fraction, params.seed)
    directory = Path(d.dir)
    # The old manifest no longer describes the shards once we start rewriting them: drop it first, so a crash
    # leaves "no manifest, run prepare" rather than a manifest pointing at other data.
    (directory / MANIFEST).unlink(missing_ok=True)
    splits = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        splits[split] = write_split(directory, split, images[idx], labels[idx], d.shard_size,
                                    show_progress=show_progress, num_classes=d.num_classes)
    write_manifest(directory, {"dataset": d.dataset, "image_size": d.image_size, "channels": d.channels,
                               "num_classes": d.num_classes, "split_seed": params.seed,
                               "val_fraction": d.val_fraction, "shard_size": d.shard_size, "splits": splits})
    return verify(directory)


def body(params: Params, _exp, args) -> None:
    summary = prepare(params, show_progress=not args.quiet)
    for split, s in summary.items():
        print(f"prepare: {split}: {s['count']} images in {s['shards']} shards, per class {s['per_class']} "
              f"-> {params.data.dir}")


def main(argv: list[str] | None = None) -> None:
    """Exits 2 with a one-line message (no traceback) on a FlowBackError (bad params, bad or damaged files)."""
    run_stage("prepare", body, argv)


if __name__ == "__main__":
    main()
