"""The GPU checklist: real peak memory beside the memory plan's estimate, step time and MFU, on one GPU, in minutes.

For the paper's ImageNet 64 model (profiles/imagenet64.yaml) it runs, with the micro-batch and checkpointing the plan
chooses for one GPU of an 8-GPU run:
- the training step of the baseline and of R-REPA 7&8 layer 6, in bf16, eager and torch.compile'd;
- one sampling micro-batch: the KV-cached reverse of every block and the denoising gradient (the sample stage's code);
- one batch of the training-free classifier;
and writes a table to results/bench/gpu_check_<device>.txt: measured peak (torch.cuda.max_memory_allocated) against
the plan's estimate (fake tensors on the CPU), time per step / per batch, TFLOP and MFU against the GPU's peak.

  python bench/gpu_check.py                       # on a GPU machine, ~5-10 minutes
  python bench/gpu_check.py --config tiny         # the same code on a tiny model (CPU: checks the script runs)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowback.builders import flow_config  # noqa: E402
from flowback.alignment.objective import Objective, align_spec  # noqa: E402
from flowback.params import load_params  # noqa: E402
from flowback.plan.classifier import classifier_pass, plan_classifier  # noqa: E402
from flowback.plan.measure import GIB, H100_BF16_TFLOPS  # noqa: E402
from flowback.plan.sample import denoise_pass, plan_sample  # noqa: E402
from flowback.plan.table import world_size  # noqa: E402
from flowback.plan.train import plan_train, train_step  # noqa: E402

RUNS = {"baseline": "baseline-s0", "R-REPA 7&8 L6": "reverse_78_l6-s0"}


def tiny(params):
    """The profile shrunk to seconds on a CPU (same code paths)."""
    m = params.model.model_copy(update={"width": 32, "layers": 6, "head_dim": 16})
    d = params.data.model_copy(update={"image_size": 16})
    enc = params.encoder.model_copy(update={"arch": "vit_small_patch14_dinov2",
                                            "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2, "num_classes": 0}})
    sample = params.sample.model_copy(update={"batch_size": 8})
    return params.model_copy(update={"model": m, "data": d, "encoder": enc, "sample": sample})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_and_time(fn, device, warmup: int, repeat: int) -> tuple[int, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    seconds = (time.perf_counter() - t0) / repeat
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    return peak, seconds


def train_case(exp, device, compile_: bool, world: int):
    from flowback.training import TrainState, checkpoint_layers

    c = plan_train(exp, world)
    m = c.value
    spec = align_spec(exp)
    enc_dim = 768 if spec else 0  # DINOv2 ViT-B/14 features
    state = TrainState(exp, enc_dim, device)
    if c.checkpointing:
        checkpoint_layers(state.model)
    obj = Objective.of(exp, state.model, state.projectors)
    step_fn = torch.compile(obj) if compile_ else obj
    cfg = state.model.cfg
    x = torch.rand(m, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (m,), device=device)
    t = torch.randn(m, cfg.num_tokens, enc_dim, device=device) if spec else None
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=exp.params.train.dtype == "bfloat16")

    def step():
        with torch.autocast(**amp):
            loss, _, _ = step_fn(x, y, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.parameters(), 1.0)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # AdamW's state; torch.compile compiles here
    sync(device)
    first = time.perf_counter() - t0
    peak, seconds = peak_and_time(step, device, warmup=2, repeat=5)
    est = train_step(exp, m, c.checkpointing)
    what = f"micro {m}{' ckpt' if c.checkpointing else ''}{' compiled' if compile_ else ''}"
    return what, peak, est.peak, seconds, est.flops, first


def sample_case(exp, device):
    from flowback.models.guidance import Guidance
    from flowback.models.sampling import sample
    from flowback.models.tarflow import TARFlow

    c = plan_sample(exp)
    model = TARFlow(flow_config(exp.params)).to(device).eval().requires_grad_(False)
    y = torch.arange(c.value, device=device) % model.cfg.num_classes
    sp = exp.params.sample
    dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None

    def run():
        sample(model, y, guidance=Guidance.of(sp.guidance), denoise_sigma=exp.params.model.noise_std, dtype=dtype)

    peak, seconds = peak_and_time(run, device, warmup=0, repeat=1)
    return f"batch {c.value}", peak, denoise_pass(exp, c.value).peak, seconds, denoise_pass(exp, c.value).flops, 0.0


def classifier_case(exp, device):
    from flowback.metrics.classifier import classify
    from flowback.models.tarflow import TARFlow

    c = plan_classifier(exp, 0)
    model = TARFlow(flow_config(exp.params)).to(device).eval().requires_grad_(False)
    cfg = model.cfg
    x = torch.rand(c.value, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    peak, seconds = peak_and_time(lambda: classify(model, x), device, warmup=1, repeat=3)
    est = classifier_pass(exp, c.value)
    return f"batch {c.value}", peak, est.peak, seconds, est.flops, 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "profiles" / "imagenet64.yaml"))
    ap.add_argument("--config", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    ap.add_argument("--out", default=None, help="table file (default results/bench/gpu_check_<device>.txt)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    params = load_params(args.params)
    if args.config == "tiny":
        params = tiny(params)
    world = world_size(params.runtime.launcher)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [f"# GPU checklist: {args.params} ({args.config}), {name}, per GPU of a {world}-GPU run, "
             f"MFU against {args.peak_tflops:g} TFLOP/s", "",
             "| case | plan's choice | peak measured (GiB) | plan's estimate (GiB) | measured / estimate | "
             "time (s) | TFLOP | MFU | first call (s) |", "|---|---|---|---|---|---|---|---|---|"]

    def row(label, result):
        what, peak, est, seconds, flops, first = result
        ratio = f"{peak / est:.2f}" if peak and est else "-"
        mfu = flops / seconds / (args.peak_tflops * 1e12)
        lines.append(f"| {label} | {what} | {peak / GIB:.2f} | {est / GIB:.2f} | {ratio} | {seconds:.3f} | "
                     f"{flops / 1e12:.2f} | {mfu:.1%} | {first:.1f} |")
        print(lines[-1], flush=True)

    print("\n".join(lines), flush=True)
    for label, run in RUNS.items():
        exp = params.run(run)
        for compile_ in (False,) if args.no_compile else (False, True):
            row(f"train {label}", train_case(exp, device, compile_, world))
    exp = params.run(RUNS["baseline"])
    row("sample + denoise", sample_case(exp, device))
    row("classifier", classifier_case(exp, device))
    out = Path(args.out or ROOT / "results" / "bench" / f"gpu_check_{'gpu' if device.type == 'cuda' else 'cpu'}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
