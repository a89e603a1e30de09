"""Benchmark: images/s of adversarial-flow 1-NFE sampling vs TARFlow KV-cached sampling, one run.

A 1-NFE AF sample is one pass of a DiT over all tokens at once; a TARFlow sample is one token at a time through every
block (T steps per block, each a cached pass over one token). Each case runs in its own process (bench/measure.py).

  python bench/af.py                        # CPU: the default profile's digit models, batch 100
  python bench/af.py --quick                # CPU, smaller batch, seconds
  python bench/af.py --config latent256     # AF-XL/2 vs the 256 px latent TARFlow (8 x 8, width 768): use a GPU
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import bench_parser, measure, mib  # noqa: E402

from flowback.models.sampling import sample  # noqa: E402
from flowback.models.tarflow import FlowConfig, TARFlow  # noqa: E402
from flowback.models.af import AFConfig, Generator, sample_af  # noqa: E402

DIGITS_AF = dict(channels=1, image_size=16, patch_size=4, width=64, depth=4, head_dim=16, mlp_ratio=2,
                 num_classes=10)
DIGITS_FLOW = dict(channels=1, image_size=16, patch_size=4, width=64, layers=(4,) * 8, head_dim=16, mlp_ratio=2,
                   num_classes=10)
CONFIGS = {
    "quick": dict(af=DIGITS_AF, flow=DIGITS_FLOW, batch=20),
    # the default profile: the TARFlow rows' flow (8 blocks x 4 layers) and the proposed digits AF generator
    "cpu": dict(af=DIGITS_AF, flow=DIGITS_FLOW, batch=100),
    # 4 x 32 x 32 latents, patch 2 (256 tokens): AF-XL/2 (28 x 1152) vs profiles/imagenet256.yaml's TARFlow
    "latent256": dict(af=dict(channels=4, image_size=32, patch_size=2, width=1152, depth=28, head_dim=72,
                              mlp_ratio=4, num_classes=1000),
                      flow=dict(channels=4, image_size=32, patch_size=2, width=768, layers=(8,) * 8, head_dim=64,
                                mlp_ratio=4, num_classes=1000), batch=64),
}


def setup_af(config: str, device: str, dtype: str):
    c = CONFIGS[config]
    torch.manual_seed(0)
    model = Generator(AFConfig(**c["af"])).to(device).eval()
    y = torch.arange(c["batch"], device=device) % model.cfg.num_classes
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if dtype == "bfloat16" else None
    return lambda: sample_af(model, y, g, dtype=dt)


def setup_flow(config: str, device: str, dtype: str):
    c = CONFIGS[config]
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(**c["flow"])).to(device).eval()
    y = torch.arange(c["batch"], device=device) % model.cfg.num_classes
    dt = torch.bfloat16 if dtype == "bfloat16" else None
    return lambda: sample(model, y, use_cache=True, dtype=dt)


def main(argv=None) -> float:
    ap = bench_parser(__doc__, CONFIGS)
    args = ap.parse_args(argv)
    config = args.config or ("quick" if args.quick else "cpu")
    c = CONFIGS[config]
    a, f = c["af"], c["flow"]
    af_params = sum(p.numel() for p in Generator(AFConfig(**a)).parameters())
    flow_params = sum(p.numel() for p in TARFlow(FlowConfig(**f)).parameters())
    print(f"config {config}: batch {c['batch']}, {args.device}, {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"  AF generator: depth {a['depth']}, width {a['width']}, {(a['image_size'] // a['patch_size']) ** 2} "
          f"tokens, {af_params / 1e6:.2f}M params, 1 NFE")
    print(f"  TARFlow: {len(f['layers'])} blocks x {f['layers'][0]} layers, width {f['width']}, "
          f"{(f['image_size'] // f['patch_size']) ** 2} tokens, {flow_params / 1e6:.2f}M params, KV cache")
    common = dict(config=config, device=args.device, dtype=args.dtype)
    af = measure(functools.partial(setup_af, **common), args.device, warmup=2, repeat=5)
    flow = measure(functools.partial(setup_flow, **common), args.device, warmup=1, repeat=3)
    print("\n| sampler | time / batch (s) | images/s | peak (MiB) | 50K images (h) |\n|---|---|---|---|---|")
    for name, r in (("AF, 1 NFE", af), ("TARFlow, KV cache", flow)):
        ips = c["batch"] / r["seconds"]
        print(f"| {name} | {r['seconds']:.4f} | {ips:.1f} | {mib(r['peak_bytes'])} | {50_000 / ips / 3600:.3f} |")
    speedup = flow["seconds"] / af["seconds"]
    print(f"\nspeedup (AF 1-NFE images/s over TARFlow KV-cached): {speedup:.1f}")
    return speedup


if __name__ == "__main__":
    main()
