"""ImageNet -> VAE latent shards (ImageNet 256 in the paper): centre crop, encode image and flip, store float16.

Each sample holds `mean.npy` and `std.npy`, float16 arrays (2, C, h, w) of the scaled posterior (scale * mean,
scale * std of diffusers' `latent_dist`): index 0 is the image, index 1 its horizontal flip, so training can use flip
augmentation and either the mean or a posterior sample without touching the VAE again. Plus `cls`, as in pixel shards,
and - with `data.keep_pixels`, as REPA's preprocessing keeps its images - the crop itself as `png`, because the
alignment encoder (DINOv2) needs the pixels, not the VAE's reconstruction of them.

Encoding runs in the calling process on its device, `batch_size` images per VAE pass; JPEG decoding and cropping
run in a thread pool (PIL releases the GIL while it decodes and resizes). Shards, keys, digests, skipping and
resuming follow flowback/data/imagenet.py; the digest also covers the VAE's weights and the scale, so latents of
another VAE are never reused.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .imagenet import load_image
from .writer import ShardJob
from .format import encode_png, sample_key, write_samples

MEMBERS = ("mean.npy", "std.npy", "cls")
MEMBERS_WITH_PIXELS = ("png", *MEMBERS)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class LatentShardBuilder:
    """`build(job, path)` for write_jobs: decode the job's images, encode them and their flips, write the shard."""

    def __init__(self, codec, device: torch.device, threads: int, dtype: torch.dtype = torch.float32):
        self.codec, self.device, self.threads, self.dtype = codec, device, max(1, threads), dtype
        self.seconds = {"decode": 0.0, "vae": 0.0}  # for bench/encode.py: where the time goes

    def __call__(self, job: ShardJob, path: Path) -> list[dict]:
        p = job.payload
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.threads) as pool:
            loaded = list(pool.map(lambda r: load_image(r, p["image_size"], p["resize"], p["skip_undecodable"]),
                                   p["refs"]))
        t1 = time.perf_counter()
        self.seconds["decode"] += t1 - t0
        keep = [i for i, (image, _) in enumerate(loaded) if image is not None]
        skipped = [{"index": job.first + i, "name": p["refs"][i].name, "error": loaded[i][1]}
                   for i in range(len(loaded)) if loaded[i][0] is None]
        mean = std = np.zeros((0, 2), np.float16)
        if keep:
            mean, std = self.encode(np.stack([loaded[i][0] for i in keep]))
        self.seconds["vae"] += time.perf_counter() - t1
        def sample(k: int, i: int) -> dict:
            out = {"__key__": sample_key(p["split"], job.first + i), "mean.npy": npy_bytes(mean[k]),
                   "std.npy": npy_bytes(std[k]), "cls": str(p["refs"][i].label).encode("ascii")}
            if p.get("keep_pixels"):
                out["png"] = encode_png(loaded[i][0])
            return out

        write_samples(path, (sample(k, i) for k, i in enumerate(keep)))
        return skipped

    def encode(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, 3, H, W) -> float16 mean and std (n, 2, C, h, w); [:, 1] is the encoding of the flipped image."""
        x = torch.from_numpy(images_u8).to(self.device).float() / 127.5 - 1.0
        views = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # image, flip, image, flip, ...
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            mean, std = self.codec.encode_with_std(views)
        shape = (len(x), 2, *mean.shape[1:])
        return (mean.reshape(shape).cpu().numpy().astype(np.float16),
                std.reshape(shape).cpu().numpy().astype(np.float16))


def encode_dataset(params, show_progress: bool = True) -> dict:
    """Write the latent shards of both splits and the manifest (data.format latent); returns the verify summary.

    Under torchrun each rank encodes shards rank, rank + world, ... on its own GPU; rank 0 merges the ranks' progress
    and writes the manifest; then every rank verifies its own shards and the per-class counts are summed, so no rank
    waits idle while one reads everything. Resumable like prepare: shards already written from the same images, crop
    and VAE are kept.
    """
    import os

    from ..distributed import barrier, setup
    from ..models.vae import LatentCodec, load_vae, vae_fingerprint
    from ..params import ParamsError
    from ..runtime import configure
    from .imagenet import make_jobs, written_labels
    from .manifest import MANIFEST, check_counts, count_shards, load_manifest, prepared_settings, write_manifest
    from .sources import list_imagenet
    from .writer import collect_entries, split_entry, write_jobs

    d, lp = params.data, params.model.latent
    dev, rank, world = setup(configure(params.runtime))
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
    barrier()
    if rank == 0:
        splits = {}
        for split, split_jobs in jobs.items():
            entries = collect_entries(directory, split, split_jobs)
            splits[split] = split_entry(entries, written_labels(refs[split], entries), d.num_classes)
        write_manifest(directory, {**prepared_settings(params), "shard_size": d.shard_size, "source": str(d.source),
                                   "wnids": wnids, "members": list(MEMBERS_WITH_PIXELS if d.keep_pixels else MEMBERS),
                                   "latent_shape": latent_shape, "vae": settings["vae"], "vae_hub": lp.hub,
                                   "scale": lp.scale, "splits": splits})
    barrier()
    manifest = load_manifest(directory)
    summary = {}
    for split in manifest.splits:
        counts = torch.from_numpy(count_shards(directory, split, slice(rank, None, world), manifest=manifest))
        if world > 1:
            counts = counts.to(dev)
            torch.distributed.all_reduce(counts)
        summary[split] = check_counts(directory, manifest, split, counts.cpu().numpy())
    return summary
