"""A small adversarial flow model on the embedded digits: train, sample 1 NFE, score, save a sample grid.

Needs the prepared data and the metric network (`python -m stages.prepare`, `python -m stages.metricnet`,
`python -m stages.reference`). Writes results/bench/af_digits_samples.png (one row per class) and prints FID, sFID,
IS, precision/recall against the digit reference and "Cond. acc." = how often DigitNet's predicted class equals the
label the sample was generated for.

  python bench/af_digits.py                        # the proposed default profile (about 2-3 minutes on 1 thread)
  python bench/af_digits.py --steps 500 --out x.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowback.af_training import train_af, train_flow_classifier  # noqa: E402
from flowback.data.images import nchw_to_nhwc, to_uint8  # noqa: E402
from flowback.data.shards import read_split  # noqa: E402
from flowback.metrics.generative import extract_features, load_feature_network  # noqa: E402
from flowback.metrics.reference import load_reference  # noqa: E402
from flowback.models.af import AFConfig, sample_af  # noqa: E402
from flowback.models.af_objective import AFTrainConfig  # noqa: E402
from flowback.sampler import sample_labels, image_grid  # noqa: E402

# the proposed digits profile: patch 4 -> 16 tokens of 16 values, as the TARFlow rows
MODEL = dict(channels=1, image_size=16, patch_size=4, width=64, depth=4, head_dim=16, mlp_ratio=2, num_classes=10)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="results/data/digits")
    ap.add_argument("--metric-dir", default="results/encoders/metric")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="generator learning rate")
    ap.add_argument("--lr-d", type=float, default=2e-4, help="discriminator learning rate")
    ap.add_argument("--ot-start", type=float, default=0.2)
    ap.add_argument("--ot-end", type=float, default=0.005)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--gp", type=float, default=0.25)
    ap.add_argument("--width", type=int, default=MODEL["width"])
    ap.add_argument("--depth", type=int, default=MODEL["depth"])
    ap.add_argument("--patch", type=int, default=MODEL["patch_size"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cg", type=float, default=0.0, help="flow-based classifier guidance weight (0 = off)")
    ap.add_argument("--cg-steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--out", default="results/bench/af_digits_samples.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels = read_split(args.data, "train")
    cfg = AFConfig(**{**MODEL, "width": args.width, "depth": args.depth, "patch_size": args.patch,
                      "repeat": args.repeat})
    tc = AFTrainConfig(lr_g=args.lr, lr_d=args.lr_d, ema_decay=args.ema, ot_start=args.ot_start, ot_end=args.ot_end,
                       ot_decay_steps=args.steps, gp_weight=args.gp, cg_weight=args.cg)
    classifier, cls_seconds = None, 0.0
    if args.cg > 0:
        t0 = time.perf_counter()
        classifier = train_flow_classifier(cfg, images, labels, args.cg_steps, args.batch, lr=1e-3, seed=args.seed,
                                           show_progress=False)
        cls_seconds = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    state = train_af(cfg, images, labels, args.steps, args.batch, seed=args.seed, train=tc, classifier=classifier,
                     log_every=100, show_progress=False)
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    for row in state.log:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})

    y = torch.from_numpy(sample_labels(10, args.per_class))
    t0 = time.perf_counter()
    x = sample_af(state.ema, y, torch.Generator().manual_seed(1))
    sample_seconds = time.perf_counter() - t0
    u8 = to_uint8(x)
    nhwc = nchw_to_nhwc(u8).numpy()

    net = load_feature_network("digitnet", args.metric_dir)
    ref = load_reference(Path(args.metric_dir) / "reference" / "digits-train.npz")
    feats = extract_features(net, u8, 256, show_progress=False)
    m = ref.metrics(feats)
    m["cond_acc"] = 100.0 * float((feats["logits"].argmax(1) == y).float().mean())
    params = sum(p.numel() for p in state.generator.parameters())
    dparams = sum(p.numel() for p in state.discriminator.parameters())

    from PIL import Image

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(nhwc, y.numpy(), 10)
    Image.fromarray(np.repeat(np.repeat(grid[..., 0], 3, 0), 3, 1)).save(out)
    print(f"settings: {vars(args)}")
    print(f"generator {params / 1e3:.0f}K params, discriminator {dparams / 1e3:.0f}K; "
          f"train {train_seconds:.1f} s wall, "
          f"{train_cpu:.1f} s CPU ({args.steps} steps of batch {args.batch}, {args.threads} thread(s))"
          + (f", flow classifier {cls_seconds:.1f} s" if classifier is not None else ""))
    print(f"1-NFE sampling: {len(y)} images in {sample_seconds:.2f} s ({len(y) / sample_seconds:.0f} images/s)")
    print(f"FID {m['fid']:.2f}  sFID {m['sfid']:.2f}  IS {m['is']:.2f}  P {m['precision']:.3f}  "
          f"R {m['recall']:.3f}  Cond. acc. {m['cond_acc']:.1f}%  -> {out}")
    return m


if __name__ == "__main__":
    main()
