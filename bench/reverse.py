"""Benchmark: one alignment training step with the naive vs the pseudo reverse, each strategy's overhead, and the
cost of each reverse gradient (`align.reverse_grad`).

Table 1 times a full step (forward, alignment, backward) of R-REPA with the reverse path computed by the naive
autoregressive inverse (token by token, KV-cached) and by the pseudo-reverse (one parallel pass per block over the
cached block inputs), with peak memory. Table 2 gives every ablation strategy's step time over the baseline step,
with encoder targets cached (precomputed, as FlowBack trains) and, for R-REPA 7&8, with the encoder run in the
step. Table 3 gives each reverse_grad variant (paper | exact | newest, docs/reverse-gradient.md) over the baseline,
on the same model with its affine heads randomised (at the zero initialisation no token depends on its context,
and exact and newest would cost what paper costs), and how many adjoint backward passes each block took. Each case
runs in its own process (bench/measure.py).

  python bench/reverse.py --quick           # CPU, seconds; last line "speedup: <naive / pseudo step time>"
  python bench/reverse.py --config paper64  # the paper's ImageNet 64 model (use a GPU)
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import bench_parser, measure, mib  # noqa: E402

from flowback.alignment.encoder import EncoderConfig, FrozenEncoder# noqa: E402
from flowback.alignment.loss import match_grid# noqa: E402
from flowback.alignment.positions import parse_position# noqa: E402
from flowback.alignment.strategies import AlignSpec# noqa: E402
from flowback.alignment.reverse import exact_reverse_features, newest_reverse_features  # noqa: E402
from flowback.models.tarflow import FlowConfig, TARFlow  # noqa: E402
from flowback.alignment.objective import make_projectors, objective  # noqa: E402

CONFIGS = {
    # name: flow config kwargs, batch, encoder (timm vit kwargs + input size)
    "quick": dict(flow=dict(channels=3, image_size=16, patch_size=2, width=64, layers=(4,) * 8, head_dim=16,
                            mlp_ratio=2, num_classes=10), batch=16,
                  encoder=dict(kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4), size=32)),
    "cpu": dict(flow=dict(channels=3, image_size=32, patch_size=2, width=64, layers=(4,) * 8, head_dim=16,
                          mlp_ratio=4, num_classes=100), batch=8,
                encoder=dict(kwargs=dict(img_size=112, patch_size=14, embed_dim=192, depth=6, num_heads=3), size=112)),
    "paper64": dict(flow=dict(channels=3, image_size=64, patch_size=2, width=768, layers=(8,) * 8, head_dim=64,
                              mlp_ratio=4, num_classes=1000), batch=32,
                    encoder=dict(kwargs=dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12),
                                 size=224)),
}


def make_encoder(spec: dict, device: str) -> FrozenEncoder:
    import timm

    cfg = EncoderConfig(arch="vit_base_patch14_dinov2", kwargs={**spec["kwargs"], "num_classes": 0},
                        input_size=spec["size"])
    net = timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs)  # random init: timing only
    return FrozenEncoder(net, cfg).to(device)


def make_model(cfg: FlowConfig, device: str, random_heads: bool) -> TARFlow:
    """TARFlow at its initialisation; random_heads gives every block a non-trivial affine head (std 0.25/sqrt(width)
    weights: a(u) of order 0.25 per unit of hidden state) so that tokens depend on their context."""
    torch.manual_seed(0)
    model = TARFlow(cfg)
    if random_heads:
        with torch.no_grad():
            for blk in model.blocks:
                blk.proj_out.weight.normal_(0, 0.25 / cfg.width**0.5)
    return model.to(device)


def setup_step(config: str, device: str, strategy: str, position: str | None, reverse_impl: str = "pseudo",
               encoder_in_step: bool = False, dtype: str = "float32", reverse_grad: str = "paper",
               reverse_tol: float = 0.0, random_heads: bool = False):
    c = CONFIGS[config]
    cfg = FlowConfig(**c["flow"])
    model = make_model(cfg, device, random_heads)
    B = c["batch"]
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    y = torch.randint(0, cfg.num_classes, (B,), device=device)
    spec = None
    if strategy != "none":
        spec = AlignSpec(strategy, tuple(parse_position(position, list(cfg.layers))), reverse_impl, reverse_grad,
                         reverse_tol)
    encoder = make_encoder(c["encoder"], device) if spec else None
    projectors = make_projectors(spec, cfg.width, 2048 if config == "paper64" else 256,
                                 encoder.dim if encoder else 0).to(device)
    targets = match_grid(encoder(x), cfg.grid) if spec else None
    params = list(model.parameters()) + list(projectors.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with amp:
            tgt = match_grid(encoder(x), cfg.grid) if encoder_in_step else targets
            loss, _, _ = objective(model, projectors, spec, x, y, tgt, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> float:
    ap = bench_parser(__doc__, CONFIGS)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--tables", default="1,2,3", help="which tables to run, e.g. 3 (the headline needs table 1)")
    args = ap.parse_args(argv)
    tables = {int(t) for t in args.tables.split(",")}
    config = args.config or ("quick" if args.quick else "cpu")
    repeat = args.repeat or (3 if args.quick else 5)
    run = functools.partial(measure, device=args.device, warmup=1, repeat=repeat)
    common = dict(config=config, device=args.device, dtype=args.dtype)
    c = CONFIGS[config]["flow"]
    tokens = (c["image_size"] // c["patch_size"]) ** 2
    print(f"config {config}: {len(c['layers'])} blocks x {c['layers'][0]} layers, width {c['width']}, {tokens} tokens, "
          f"batch {CONFIGS[config]['batch']}, {args.device}, {args.dtype}")

    headline = None
    if 1 in tables:
        positions = ["7&8"] if args.quick else ["7&8", "all"]
        print("\n| R-REPA position | naive step (s) | pseudo step (s) | speedup | naive peak (MiB) | "
              "pseudo peak (MiB) | memory ratio |\n|---|---|---|---|---|---|---|")
        for pos in positions:
            naive = run(functools.partial(setup_step, strategy="reverse", position=pos, reverse_impl="naive",
                                          **common), repeat=2, warmup=0)  # slow: first call (memory) + one more
            pseudo = run(functools.partial(setup_step, strategy="reverse", position=pos, **common))
            speedup = naive["seconds"] / pseudo["seconds"]
            if headline is None:
                headline = speedup
            print(f"| {pos} | {naive['seconds']:.3f} | {pseudo['seconds']:.3f} | {speedup:.1f}x | "
                  f"{mib(naive['peak_bytes'])} | {mib(pseudo['peak_bytes'])} | "
                  f"{pseudo['peak_bytes'] / max(naive['peak_bytes'], 1):.2f} |")

    if 2 in tables:
        rows = [("TARFlow baseline", "none", None, False), ("Forward", "forward", "all", False),
                ("Detach", "detach", "all", False), ("Reverse", "reverse", "all", False),
                ("Forward", "forward", "1&2", False), ("Detach", "detach", "7&8", False),
                ("Reverse", "reverse", "7&8", False), ("Reverse", "reverse", f"7&8 layer {c['layers'][0] - 2}", False),
                ("Reverse, encoder in step", "reverse", "7&8", True)]
        if args.quick:
            rows = [r for r in rows if r[2] in (None, "7&8")]
        print("\n| Strategy | Position | step (s) | over baseline | peak (MiB) |\n|---|---|---|---|---|")
        base = None
        for label, strategy, pos, enc in rows:
            r = run(functools.partial(setup_step, strategy=strategy, position=pos, encoder_in_step=enc, **common))
            base = base or r["seconds"]
            print(f"| {label} | {pos or '-'} | {r['seconds']:.3f} | {r['seconds'] / base:.2f}x | "
                  f"{mib(r['peak_bytes'])} |")

    if 3 in tables:
        print("\n| reverse_grad | implementation | step (s) | over baseline | peak (MiB) | peak over baseline | "
              "adjoint passes per block |\n|---|---|---|---|---|---|---|")
        variants = [("baseline", "none", "pseudo", "paper", 0.0), ("paper", "reverse", "pseudo", "paper", 0.0),
                    ("exact", "reverse", "pseudo", "exact", 0.0),
                    ("exact, tol 1e-5", "reverse", "pseudo", "exact", 1e-5),
                    ("exact", "reverse", "naive", "exact", 0.0), ("newest", "reverse", "pseudo", "newest", 0.0)]
        base = None
        for label, strategy, impl, grad, tol in variants:
            slow = impl == "naive"
            r = run(functools.partial(setup_step, strategy=strategy, position=None if strategy == "none" else "7&8",
                                      reverse_impl=impl, reverse_grad=grad, reverse_tol=tol, random_heads=True,
                                      **common),
                    **(dict(repeat=2, warmup=0) if slow else {}))
            base = base or r
            how = "-" if strategy == "none" else "sequential inverse (naive)" if slow else "parallel"
            passes = adjoint_passes(config, args.device, grad, tol) if strategy != "none" and not slow else "-"
            print(f"| {label} | {how} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f}x | "
                  f"{mib(r['peak_bytes'])} | {r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x | {passes} |")
    if headline is not None:
        print(f"\nspeedup: {headline:.1f}")
    return headline


def adjoint_passes(config: str, device: str, grad: str, tol: float) -> str:
    """Adjoint passes per block (top block first) in one step: backward passes of the block beyond the one that gives
    the parameters their gradients; paper solves nothing."""
    if grad == "paper":
        return "0"
    cfg = FlowConfig(**CONFIGS[config]["flow"])
    model = make_model(cfg, device, random_heads=True)
    B = CONFIGS[config]["batch"]
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    y = torch.randint(0, cfg.num_classes, (B,), device=device)
    spec = AlignSpec("reverse", tuple(parse_position("7&8", list(cfg.layers))), reverse_grad=grad, reverse_tol=tol)
    out = model(x, y, keep_inputs=True)
    fn = exact_reverse_features if grad == "exact" else newest_reverse_features
    passes: list[int] = []
    feats = fn(model, out, model.conditions(y, None, B), spec, sweeps=passes)
    sum(h.pow(2).mean() for h in feats.values()).backward()
    bound = f"at most {cfg.num_tokens + 1}" if grad == "exact" else f"= token dim {cfg.token_dim}"
    return ", ".join(map(str, passes)) + f" ({bound})"


if __name__ == "__main__":
    main()
