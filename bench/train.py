"""Benchmark: training images/s and model FLOPs utilisation (MFU) of the baseline and R-REPA, and sampling images/s.

A training step is what `flowback.training.train` does per step on one device: `objective(model, projectors, spec,
x, y, targets, weight)` (forward, and for R-REPA the pseudo-reverse alignment at blocks "7&8"), backward, gradient
clipping and an AdamW step. R-REPA's targets are random tensors of the encoder's feature size (768-d for paper64, as
DINOv2 ViT-B/14 gives), already on the flow's token grid: FlowBack caches encoder features before training
(`encode_targets`), so the encoder costs nothing per step and is not run here.

FLOPs are counted once per case by torch.utils.flop_counter.FlopCounterMode over one whole step (forward and
backward) on the same device and dtype. It counts matrix multiplies and attention (causal attention counted as full,
the usual convention), not element-wise work or the optimizer. R-REPA's count includes its pseudo-reverse passes, so
its MFU is the device's utilisation on the work the step really does. MFU = FLOPs / step time / peak, with peak from
--peak-tflops, else 989 TFLOP/s on CUDA (H100 SXM, dense bf16), else a matmul timed on this machine in the step's
dtype (a CPU has no datasheet number to compare with). Times are per device; an 8-GPU DDP node adds gradient
all-reduce on top.

Sampling is KV-cached `flowback.models.sample` of the same model (no denoising step, no guidance unless --guided),
with the hours one device needs for 50,000 images. Each case runs in its own process (bench/measure.py).

  python bench/train.py --quick                               # CPU, seconds
  python bench/train.py --config paper64 --dtype bfloat16     # the paper's ImageNet 64 TARFlow, per-GPU batch 32
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import bench_parser, measure, mib  # noqa: E402

from flowback.alignment.strategies import AlignSpec# noqa: E402
from flowback.models.guidance import Guidance# noqa: E402
from flowback.models.sampling import sample# noqa: E402
from flowback.models.tarflow import FlowConfig, TARFlow# noqa: E402
from flowback.alignment.positions import parse_position  # noqa: E402
from flowback.plan.measure import register_cpu_attention_flops  # noqa: E402
from flowback.alignment.objective import make_projectors, objective  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
SAMPLES_FOR_FID = 50_000

CONFIGS = {
    # flow: FlowConfig kwargs; batch: training images per device; enc_dim: encoder feature size (R-REPA targets);
    # projector: REPA projector hidden size; sample_batch: images per sampling call
    "quick": dict(flow=dict(channels=3, image_size=16, patch_size=2, width=64, layers=(2,) * 8, head_dim=16,
                            mlp_ratio=2, num_classes=10), batch=8, enc_dim=64, projector=128, sample_batch=8),
    "cpu": dict(flow=dict(channels=3, image_size=32, patch_size=2, width=128, layers=(4,) * 8, head_dim=32,
                          mlp_ratio=4, num_classes=100), batch=8, enc_dim=192, projector=256, sample_batch=8),
    # the paper's ImageNet 64 TARFlow: batch 256 = 8 GPUs x 32; DINOv2 ViT-B/14 features (768-d)
    "paper64": dict(flow=dict(channels=3, image_size=64, patch_size=2, width=768, layers=(8,) * 8, head_dim=64,
                              mlp_ratio=4, num_classes=1000), batch=32, enc_dim=768, projector=2048,
                    sample_batch=256),
}

CASES = [("TARFlow baseline", "none", None), ("R-REPA", "reverse", "7&8")]


def _autocast(device: str, dtype: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _config(config: str | dict) -> dict:
    return CONFIGS[config] if isinstance(config, str) else config  # a dict reaches the fork server's children too


def setup_step(config: str | dict, device: str, strategy: str, position: str | None, dtype: str = "float32"):
    """One training step on one device, as flowback.training.train takes it; returns the step callable."""
    c = _config(config)
    torch.manual_seed(0)
    cfg = FlowConfig(**c["flow"])
    model = TARFlow(cfg).to(device).train()
    B = c["batch"]
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
    y = torch.randint(0, cfg.num_classes, (B,), device=device)
    spec = AlignSpec(strategy, tuple(parse_position(position, list(cfg.layers)))) if strategy != "none" else None
    projectors = make_projectors(spec, cfg.width, c["projector"], c["enc_dim"]).to(device)
    # random stand-ins for cached encoder features on the flow's token grid (B, tokens, enc_dim)
    targets = torch.randn(B, cfg.num_tokens, c["enc_dim"], device=device) if spec else None
    params = list(model.parameters()) + list(projectors.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    amp = _autocast(device, dtype)

    def step():
        with amp:
            loss, _, _ = objective(model, projectors, spec, x, y, targets, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def setup_sample(config: str | dict, device: str, dtype: str = "float32", guided: bool = False,
                 batch: int | None = None):
    c = _config(config)
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(**c["flow"])).to(device).eval()
    y = torch.arange(batch or c["sample_batch"], device=device) % model.cfg.num_classes
    g = Guidance("tarflow", 2.0) if guided else None
    dt = torch.bfloat16 if dtype == "bfloat16" else None
    return lambda: sample(model, y, guidance=g, use_cache=True, dtype=dt)


def setup_matmul(device: str, dtype: str, n: int):
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
    return lambda: a @ b


def count_flops(setup) -> int:
    """FLOPs of one call of setup()'s callable (forward and backward), counted by FlopCounterMode."""
    register_cpu_attention_flops()
    fn = setup()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _child(fn, conn) -> None:
    try:
        conn.send({"value": fn()})
    except Exception as e:  # report, don't hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})


def in_child(fn):
    """fn() in a fresh process from measure's fork server, so the parent holds no model or device memory."""
    ctx = mp.get_context("forkserver")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, child))
    proc.start()
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["value"]


def linear_params(cfg: FlowConfig) -> int:
    """Weights of the flow's nn.Linear layers: a step does at least 6 * this * tokens * batch FLOPs (6N per token)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = TARFlow(cfg)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def main(argv=None) -> list[dict]:
    ap = bench_parser(__doc__, CONFIGS)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak for MFU (default: 989 on CUDA = H100 SXM dense bf16; on a CPU a timed "
                         "matmul in the step's dtype)")
    ap.add_argument("--guided", action="store_true", help="sample with classifier-free guidance (2B rows per step)")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)
    config = args.config or ("quick" if args.quick else "cpu")
    repeat = args.repeat or (2 if args.quick else 3)
    c = CONFIGS[config]
    f = c["flow"]
    cfg = FlowConfig(**f)
    dev, dtype = args.device, args.dtype
    print(f"config {config}: {len(cfg.layers)} blocks x {cfg.layers[0]} layers, width {cfg.width}, "
          f"{cfg.num_tokens} tokens, batch {c['batch']} per device, R-REPA targets {c['enc_dim']}-d, {dev}, {dtype}")
    if not dev.startswith("cuda"):  # other processes on the cores slow the many small ops of sampling the most
        print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
              f"{os.getloadavg()[0]:.2f} at the start")

    matmul_n = 8192 if dev.startswith("cuda") else 1024 if args.quick else 2048
    mm = measure(functools.partial(setup_matmul, dev, dtype, matmul_n), dev, warmup=2, repeat=10)
    measured_tflops = 2 * matmul_n**3 / mm["seconds"] / 1e12
    if args.peak_tflops is not None:
        peak, peak_src = args.peak_tflops, "--peak-tflops"
    elif dev.startswith("cuda"):
        peak, peak_src = H100_BF16_DENSE_TFLOPS, "H100 SXM dense bf16"
        if dtype != "bfloat16":
            peak_src += "; this run is float32: pass --peak-tflops with the float32/TF32 peak"
    else:
        peak, peak_src = measured_tflops, f"timed {matmul_n}x{matmul_n} {dtype} matmul"
    print(f"matmul {matmul_n}^3 {dtype}: {measured_tflops:.3f} TFLOP/s measured; MFU peak {peak:.3f} TFLOP/s "
          f"({peak_src})")

    rows = []
    for label, strategy, position in CASES:
        setup = functools.partial(setup_step, c, dev, strategy, position, dtype)
        flops = in_child(functools.partial(count_flops, setup))
        r = measure(setup, dev, warmup=1, repeat=repeat)
        rows.append(dict(case=f"{label}{' ' + position if position else ''}", seconds=r["seconds"],
                         images=c["batch"], flops=flops, peak_bytes=r["peak_bytes"]))
    samp = functools.partial(setup_sample, c, dev, dtype, args.guided)
    # FLOPs are linear in the batch: count one image's sampling and scale (the counter slows the token loop)
    flops = in_child(functools.partial(count_flops, functools.partial(setup_sample, c, dev, dtype, args.guided,
                                                                       batch=1))) * c["sample_batch"]
    r = measure(samp, dev, warmup=1, repeat=1)  # the first call is slower (allocations, kernel selection)
    rows.append(dict(case=f"sampling, KV cache{', guided' if args.guided else ''}", seconds=r["seconds"],
                     images=c["sample_batch"], flops=flops, peak_bytes=r["peak_bytes"], sampling=True))

    print("\n| case | step time (s) | images/s | GFLOP/step | achieved TFLOP/s | MFU | peak memory (MiB) | "
          "50K images (h) |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["images_per_second"] = row["images"] / row["seconds"]
        row["tflops"] = row["flops"] / row["seconds"] / 1e12
        row["mfu"] = row["tflops"] / peak
        hours = f"{SAMPLES_FOR_FID / row['images_per_second'] / 3600:.2f}" if row.get("sampling") else "-"
        print(f"| {row['case']} | {row['seconds']:.4f} | {row['images_per_second']:.2f} | {row['flops'] / 1e9:.2f} | "
              f"{row['tflops']:.4f} | {row['mfu']:.4f} | {mib(row['peak_bytes'])} | {hours} |")
    base, rrepa = rows[0], rows[1]
    print()
    if not dev.startswith("cuda"):
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print(f"sampling row: one call of {c['sample_batch']} images; its 'step' is the whole generation")
    print(f"R-REPA 7&8 over baseline: {rrepa['seconds'] / base['seconds']:.2f}x step time, "
          f"{rrepa['flops'] / base['flops']:.2f}x FLOPs")
    print(f"6N check: baseline counts {base['flops'] / (6 * linear_params(cfg) * cfg.num_tokens * c['batch']):.2f}x "
          f"6 x linear weights x tokens x batch (above 1: attention scores)")
    return rows


if __name__ == "__main__":
    main()
