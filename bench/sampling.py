"""Benchmark: KV-cached vs uncached autoregressive sampling, same model, same batch, one run.

Uncached sampling recomputes every token's whole prefix at each step (O(T^2) token passes per layer); the cache
feeds only the newest token (O(T)). Each case runs in its own process (bench/measure.py) for its peak memory.

  python bench/sampling.py --quick           # CPU, seconds; last line "speedup: <uncached / cached time>"
  python bench/sampling.py --config paper64  # the paper's ImageNet 64 model, 1024 tokens (use a GPU, bf16)
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import bench_parser, measure, mib  # noqa: E402

from flowback.models.guidance import Guidance# noqa: E402
from flowback.models.sampling import sample# noqa: E402
from flowback.models.tarflow import FlowConfig, TARFlow# noqa: E402

CONFIGS = {
    # 1024 tokens, the paper's 64x64 token count (64 / patch 2 = 32 x 32), in a model small enough for a CPU
    "quick": dict(flow=dict(channels=3, image_size=32, patch_size=1, width=48, layers=(1, 1), head_dim=16,
                            mlp_ratio=2, num_classes=10), batch=4),
    "cpu": dict(flow=dict(channels=3, image_size=32, patch_size=1, width=64, layers=(2,) * 4, head_dim=16,
                          mlp_ratio=4, num_classes=100), batch=8),
    "paper64": dict(flow=dict(channels=3, image_size=64, patch_size=2, width=768, layers=(8,) * 8, head_dim=64,
                              mlp_ratio=4, num_classes=1000), batch=64),
}


def setup_sample(config: str, device: str, use_cache: bool, dtype: str, guided: bool):
    c = CONFIGS[config]
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(**c["flow"])).to(device).eval()
    y = torch.arange(c["batch"], device=device) % model.cfg.num_classes
    g = Guidance("tarflow", 2.0) if guided else None
    dt = torch.bfloat16 if dtype == "bfloat16" else None
    return lambda: sample(model, y, guidance=g, use_cache=use_cache, dtype=dt)


def main(argv=None) -> float:
    ap = bench_parser(__doc__, CONFIGS)
    ap.add_argument("--guided", action="store_true", help="classifier-free guidance (2B rows per step)")
    args = ap.parse_args(argv)
    config = args.config or ("quick" if args.quick else "cpu")
    c = CONFIGS[config]
    f = c["flow"]
    tokens = (f["image_size"] // f["patch_size"]) ** 2
    print(f"config {config}: {len(f['layers'])} blocks x {f['layers'][0]} layers, width {f['width']}, {tokens} tokens, "
          f"batch {c['batch']}, {args.device}, {args.dtype}{', guided' if args.guided else ''}")
    common = dict(config=config, device=args.device, dtype=args.dtype, guided=args.guided)
    cached = measure(functools.partial(setup_sample, use_cache=True, **common), args.device, warmup=1, repeat=3)
    uncached = measure(functools.partial(setup_sample, use_cache=False, **common), args.device, warmup=0, repeat=1)
    speedup = uncached["seconds"] / cached["seconds"]
    print("\n| sampler | time / batch (s) | images/s | peak (MiB) | 50K images (h) |\n|---|---|---|---|---|")
    for name, r in (("KV cache", cached), ("no cache", uncached)):
        ips = c["batch"] / r["seconds"]
        print(f"| {name} | {r['seconds']:.3f} | {ips:.1f} | {mib(r['peak_bytes'])} | {50_000 / ips / 3600:.2f} |")
    print(f"\nmemory (cached / uncached): {cached['peak_bytes'] / max(uncached['peak_bytes'], 1):.2f}")
    print(f"speedup: {speedup:.1f}")
    return speedup


if __name__ == "__main__":
    main()
