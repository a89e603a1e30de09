"""What the default profile's alignment encoder learns, per training objective: how decodable the class is from its
features, and how much of its patch features the class alone explains.

    python bench/encoders.py [--quick] [--supervised-steps N] [--simclr-steps N] [--out FILE]

Data and encoder settings are the default profile's (params.yaml: digits at data.image_size, split by
data.val_fraction seeded by `seed`; encoder.arch/kwargs; encoder.train lr/batch/seed). Rows: the raw pixels (the
data's own floor; 4x4 pixel patches as "tokens"), the untrained ViT, then each objective. Columns, all on the val
split, features fitted or indexed on the train split:
- probe: a standardised logistic-regression probe on mean-pooled patch tokens (flowback.metrics.probe.fit_probe).
- knn: 10-nearest-neighbour vote (cosine, train-mean centred) on mean-pooled patch tokens.
- token knn: the same for single patch tokens (any position), each labelled by its image: how much class one
  patch token carries.
- class var: pretrain.class_variance_fraction on val patch tokens: the share of their variance that the class means
  explain (1 = a feature is its class's mean; alignment would inject only the label).
Nothing here is a unit test: read the table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowback.alignment.encoder import EncoderConfig  # noqa: E402
from flowback.alignment.pretrain import (  # noqa: E402
    class_variance_fraction,
    patch_features,
    train_encoder,
)
from flowback.data.digits import load_digits_images, stratified_split  # noqa: E402
from flowback.data.images import to_model  # noqa: E402
from flowback.metrics.probe import fit_probe  # noqa: E402
from flowback.params import load_params  # noqa: E402


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, k: int = 10) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    centre = train_x.mean(axis=0)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    return float(knn.fit(train_x - centre, train_y).score(val_x - centre, val_y))


def pixel_patches(images_u8: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 1, S, S) -> (N, patches, patch * patch) raw pixel values: the 'features' of no encoder at all."""
    x = to_model(images_u8)
    return torch.nn.functional.unfold(x, patch, stride=patch).transpose(1, 2)


def row(name: str, train_f: torch.Tensor, val_f: torch.Tensor, ytr: torch.Tensor, yva: torch.Tensor,
        seconds: float | None) -> dict:
    tr, va, ytr_np, yva_np = train_f.double().numpy(), val_f.double().numpy(), ytr.numpy(), yva.numpy()
    probe, _ = fit_probe(tr.mean(1), ytr_np, (va.mean(1),), (yva_np,))
    tokens = lambda f: f.reshape(-1, f.shape[-1])  # noqa: E731
    return {"features": name, "train (s)": "-" if seconds is None else f"{seconds:.0f}",
            "probe": f"{probe:.3f}", "knn": f"{knn_accuracy(tr.mean(1), ytr_np, va.mean(1), yva_np):.3f}",
            "token knn": f"{knn_accuracy(tokens(tr), np.repeat(ytr_np, tr.shape[1]), tokens(va), np.repeat(yva_np, va.shape[1])):.3f}",
            "class var": f"{class_variance_fraction(val_f, yva):.3f}"}


def main(argv=None) -> None:
    import argparse

    import timm
    from tabulate import tabulate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--supervised-steps", type=int, default=None, help="default: encoder.train.steps")
    ap.add_argument("--simclr-steps", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="20 steps each: checks the script, not the encoders")
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    p = load_params(args.params)
    ep, spec = p.encoder, p.encoder.train
    cfg = EncoderConfig.of(ep)
    images, labels = load_digits_images(p.data.image_size)
    tr, va = stratified_split(labels, p.data.val_fraction, p.seed)
    xtr, ytr, xva, yva = (torch.from_numpy(a) for a in (images[tr], labels[tr], images[va], labels[va]))
    steps = {"supervised": args.supervised_steps or spec.steps, "simclr": args.simclr_steps}
    if args.quick:
        steps = {k: 20 for k in steps}

    rows = [row("pixels (4x4 patches)", pixel_patches(xtr, 4), pixel_patches(xva, 4), ytr, yva, None)]
    torch.manual_seed(spec.seed)
    untrained = timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs).eval()
    rows.append(row("untrained ViT", patch_features(untrained, cfg, xtr), patch_features(untrained, cfg, xva),
                    ytr, yva, None))
    for objective, n in steps.items():
        t0 = time.perf_counter()
        net, _ = train_encoder(xtr, ytr, cfg, p.data.num_classes, n, spec.batch_size, spec.lr, spec.seed,
                               show_progress=False, objective=objective, temperature=args.temperature)
        seconds = time.perf_counter() - t0
        name = f"{objective} ({n} steps)" + (f", T={args.temperature}" if objective == "simclr" else "")
        rows.append(row(name, patch_features(net, cfg, xtr), patch_features(net, cfg, xva), ytr, yva, seconds))
        print(f"done: {name}", file=sys.stderr, flush=True)

    table = tabulate(rows, headers="keys", tablefmt="github")
    head = (f"# bench/encoders.py: {len(xtr)} train / {len(xva)} val digits at {p.data.image_size} px; encoder "
            f"{cfg.arch} {cfg.kwargs}; batch {spec.batch_size}, lr {spec.lr}, seed {spec.seed}; "
            f"torch threads {torch.get_num_threads()}")
    print(head + "\n" + table)
    if args.out:
        Path(args.out).write_text(head + "\n" + table + "\n")


if __name__ == "__main__":
    main()
