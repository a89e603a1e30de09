"""Stage `encode`: ImageNet -> VAE latent shards (data.format latent; ImageNet 256 in the paper).

    python -m stages.encode [--params params.yaml] [--quiet]
    torchrun --nproc_per_node 8 -m stages.encode --params params.yaml        # one GPU per rank

`python -m stages.prepare` runs this too when data.format is latent, so `dvc repro` needs no other stage. Each rank
encodes every world_size-th shard on its own GPU (RANK / WORLD_SIZE / LOCAL_RANK from torchrun); rank 0 writes the
manifest once all ranks are done, then verifies every shard. Resumable like prepare: shards already written from the
same images, crop and VAE are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flowback.builders import device as pick_device
from flowback.data.imagenet import make_jobs, written_labels
from flowback.data.latents import MEMBERS, MEMBERS_WITH_PIXELS, LatentShardBuilder
from flowback.data.shards import (MANIFEST, collect_entries, prepared_settings, split_entry, verify, write_jobs,
                                  write_manifest)
from flowback.data.sources import list_imagenet
from flowback.distributed import setup
from flowback.params import Params, ParamsError
from flowback.stage import run_stage


def encode(params: Params, show_progress: bool = True) -> dict:
    """Write the latent shards of both splits and the manifest; returns verify()'s summary (on rank 0; {} elsewhere)."""
    from flowback.models.vae import LatentCodec, load_vae, vae_fingerprint

    d, lp = params.data, params.model.latent
    dev, rank, world = setup(pick_device(params.train.device))
    directory = Path(d.dir)
    codec = LatentCodec(load_vae(lp.vae_dir, dev), lp.scale, d.encode_batch_size)
    if codec.factor * (d.image_size // codec.factor) != d.image_size:
        raise ParamsError(f"data.image_size: {d.image_size} is not a multiple of the VAE's downsampling {codec.factor}")
    latent_shape = [2, codec.latent_channels, d.image_size // codec.factor, d.image_size // codec.factor]
    settings = {"image_size": d.image_size, "resize": d.resize, "skip_undecodable": d.skip_undecodable,
                "vae": vae_fingerprint(lp.vae_dir), "scale": lp.scale, "keep_pixels": d.keep_pixels}
    wnids, refs = list_imagenet(d.source, d.num_classes, d.max_per_class)
    if rank == 0:
        (directory / MANIFEST).unlink(missing_ok=True)
    build = LatentShardBuilder(codec, dev, d.workers or len(os.sched_getaffinity(0)))
    jobs = {split: make_jobs(split, r, d.shard_size, settings) for split, r in refs.items()}
    for split, split_jobs in jobs.items():
        write_jobs(directory, split, split_jobs, build, workers=0, show_progress=show_progress and rank == 0,
                   rank=rank, world=world)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        splits = {}
        for split, split_jobs in jobs.items():
            entries = collect_entries(directory, split, split_jobs)
            splits[split] = split_entry(entries, written_labels(refs[split], entries), d.num_classes)
        write_manifest(directory, {**prepared_settings(params), "shard_size": d.shard_size, "source": str(d.source),
                                   "wnids": wnids,
                                   "members": list(MEMBERS_WITH_PIXELS if d.keep_pixels else MEMBERS), "latent_shape": latent_shape,
                                   "vae": settings["vae"], "vae_hub": lp.hub, "scale": lp.scale, "splits": splits})
        summary = verify(directory)
    if world > 1:
        torch.distributed.barrier()
    return summary if rank == 0 else {}


def body(params: Params, _exp, args) -> None:
    if params.data.format != "latent":
        raise ParamsError("data.format: stages.encode writes latent shards; set data.format: latent "
                          "(pixel shards: python -m stages.prepare)")
    from stages.prepare import report

    report(params, encode(params, show_progress=not args.quiet))


def main(argv: list[str] | None = None) -> None:
    run_stage("encode", body, argv)


if __name__ == "__main__":
    main()
