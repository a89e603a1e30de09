"""Data-side throughput: images/s for `prepare` (JPEG -> 64 px PNG shards, CPU workers) and `encode` (JPEG -> 256 px
crop -> VAE latents of image and flip), with decoding and VAE time reported separately.

    python bench/encode.py [--quick] [--images N] [--device cuda] [--dtype bfloat16]

The source is a synthetic ImageNet-shaped folder written to a temporary directory: JPEGs of ImageNet's typical size
(500 x 375, quality 90) with smooth random content, so decode cost is close to real photos'. The VAE has
stabilityai/sd-vae-ft-ema's architecture (diffusers' AutoencoderKL with the SD config) with random weights: the
arithmetic, hence the speed, is the real one; no download is needed. Nothing here is a unit test: read the table.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowback.data.imagenet import write_imagenet_split  # noqa: E402
from flowback.data.latents import LatentShardBuilder  # noqa: E402
from flowback.data.format import encode_png  # noqa: E402
from flowback.data.writer import write_jobs  # noqa: E402
from flowback.data.sources import list_imagenet  # noqa: E402
from flowback.data.transforms import crop_square, decode_rgb  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)


def make_source(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)  # smooth content: upsampled noise
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(d / f"{i:06d}.JPEG", quality=90)
    for c in range(classes):  # a val split is required by the layout; one image per class
        (root / "val" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (500, 375)).save(root / "val" / f"n{c:08d}" / "0.JPEG")
    return root


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f}"


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, finishes in about a minute on 2 cores")
    ap.add_argument("--images", type=int, default=None, help="source images (default 2000; 200 with --quick)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--vae-images", type=int, default=None, help="images through the VAE (default: 64 on cuda, "
                                                                  "8 on cpu)")
    args = ap.parse_args(argv)
    n = args.images or (200 if args.quick else 2000)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp) / "src", n)
        _, refs = list_imagenet(src, 10)
        train = refs["train"]
        print(f"{n} synthetic 500x375 JPEGs, {cores} cores, VAE on {args.device} ({args.dtype})")

        t = time.perf_counter()
        data = [r.read() for r in train]
        rows.append(("read bytes", "1 process", rate(n, time.perf_counter() - t)))
        t = time.perf_counter()
        ims = [decode_rgb(b) for b in data]
        rows.append(("JPEG decode", "1 process", rate(n, time.perf_counter() - t)))
        crop_square(ims[0], 64, "tarflow"), crop_square(ims[0], 256, "adm"), encode_png(np.zeros((3, 8, 8), np.uint8))
        t = time.perf_counter()  # (after one warm-up call each: torchvision's first import is not per-image cost)
        crops = [crop_square(im, 64, "tarflow") for im in ims]
        rows.append(("crop to 64 (tarflow)", "1 process", rate(n, time.perf_counter() - t)))
        t = time.perf_counter()
        for c in crops:
            encode_png(c)
        rows.append(("PNG encode 64 px", "1 process", rate(n, time.perf_counter() - t)))
        t = time.perf_counter()
        for im in ims:
            crop_square(im, 256, "adm")
        rows.append(("crop to 256 (adm)", "1 process", rate(n, time.perf_counter() - t)))

        for workers in sorted({1, cores}):
            out = Path(tmp) / f"png{workers}"
            t = time.perf_counter()
            write_imagenet_split(out, "train", train, image_size=64, resize="tarflow", shard_size=max(8, n // 16),
                                 num_classes=10, workers=workers, skip_undecodable=False, show_progress=False)
            seconds = time.perf_counter() - t
            rows.append(("prepare 64 px (end to end)", f"{workers} process{'es' if workers > 1 else ''}",
                         f"{n / seconds:.1f} ({seconds:.1f} s{', incl. worker start' if workers > 1 else ''})"))

        from flowback.data.imagenet import make_jobs
        from flowback.models.vae import LatentCodec, _autoencoder_kl

        dev = torch.device(args.device)
        torch.manual_seed(0)
        vae = _autoencoder_kl()(**SD_VAE).to(dev)
        m = args.vae_images or (64 if dev.type == "cuda" else 8)
        codec = LatentCodec(vae, 0.18215, batch_size=32 if dev.type == "cuda" else 4)
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        build = LatentShardBuilder(codec, dev, threads=cores, dtype=dtype)
        build.encode(np.zeros((2, 3, 256, 256), np.uint8))  # warm-up (cudnn autotune, allocator)
        jobs = make_jobs("train", train[:m], m, {"image_size": 256, "resize": "adm", "skip_undecodable": False})
        t = time.perf_counter()
        write_jobs(Path(tmp) / "latent", "train", jobs, build, show_progress=False)
        total = time.perf_counter() - t
        rows.append(("encode: decode + crop 256", f"{cores} threads", rate(m, build.seconds["decode"])))
        rows.append(("encode: VAE (image + flip)", f"{args.device} {args.dtype}", rate(m, build.seconds["vae"])))
        rows.append(("encode 256 px (end to end)", f"{args.device}", rate(m, total)))

    print("\n| step | runs on | images/s |\n|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
