"""The GPU checklist: the memory plan's numbers against one GPU, in about ten minutes, one row at a time.

For the paper's ImageNet 64 model (profiles/imagenet64.yaml), with the micro-batch and checkpointing the plan
chooses for one GPU of the profile's run (8 GPUs: DDP's gradient buffer through plan/ddp.py's stand-in), rows:
- cuda context: the memory a process holds before any tensor (against budget.CUDA_CONTEXT);
- train baseline, train R-REPA 7&8 L6: a whole optimizer step (every micro-batch) in bf16;
- sample: sampling one micro-batch as the sample stage does (KV-cached, every block, then the denoising gradient);
- classifier: one batch of the training-free classifier;
- ddp + nccl: a one-process NCCL group (gloo on a CPU), its buffers, and a step under DDP itself;
- with --compile, last: the baseline step torch.compile'd.
Same accounting as the plan: `alloc` is torch.cuda.max_memory_allocated() over the step, everything the process
holds included (the plan: tensors + workspaces); `device` is the CUDA context (first row) + the allocator's reserved
peak (the plan: the same + budget.CUDA_CONTEXT; NCCL's allowance belongs to 8-rank runs and is left out here).
FLOPs are the plan's count of the timed work (causal attention counted as executed, half of full; a sampling row's
are its whole generation: measure.py, plan/sample.py); MFU against --peak-tflops.

Each row is written to --out as it finishes (NN-row.json) and an error (an OOM included) becomes that row's result;
gpu_check.md and gpu_check.json hold all rows at the end. --budget-s skips a row that would not end in the time
left (estimated from the rows before it).

  python bench/gpu_check.py --emulate-gib 80 --budget-s 540 --out results/bench/gpu_check_gpu   # a lent GPU
  python bench/gpu_check.py --config tiny --out /tmp/gc                                         # CPU: it runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowback.params import load_params  # noqa: E402
from flowback.plan.budget import CUDA_CONTEXT, GIB  # noqa: E402
from flowback.plan.measure import H100_BF16_TFLOPS  # noqa: E402
from flowback.plan.table import world_size  # noqa: E402

RUNS = {"baseline": "baseline-s0", "R-REPA 7&8 L6": "reverse_78_l6-s0"}


def tiny(params):
    """The profile shrunk to seconds on a CPU (same code paths)."""
    m = params.model.model_copy(update={"width": 32, "layers": 6, "head_dim": 16})
    d = params.data.model_copy(update={"image_size": 16})
    enc = params.encoder.model_copy(update={"arch": "vit_small_patch14_dinov2", "input_size": 16,
                                            "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2, "num_classes": 0}})
    sample = params.sample.model_copy(update={"batch_size": 4})
    train = params.train.model_copy(update={"batch_size": 16})
    metrics = params.metrics.model_copy(update={"classifier_batch_size": 16})
    return params.model_copy(update={"model": m, "data": d, "encoder": enc, "sample": sample, "train": train,
                                     "metrics": metrics})


class Device:
    """Where rows run, and what the CUDA allocator saw."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.context = 0  # set by the cuda context row

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def clean(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def timed(self, fn, warmup: int, repeat: int) -> dict:
        """Peaks over the timed calls (after warmup), median seconds per call."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        out = {"time_s": sorted(times)[len(times) // 2]}
        if self.cuda:
            out["alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            out["device_gib"] = (self.context + torch.cuda.max_memory_reserved()) / GIB
        return out


def plan_columns(m, world: int) -> dict:
    """The plan's estimate in the measured rows' accounting (NCCL's allowance is not in a one-process row)."""
    return {"plan_alloc_gib": m.allocated / GIB, "plan_device_gib": (m.allocated + CUDA_CONTEXT) / GIB,
            "tflop": m.flops / 1e12}


# ---------------------------------------------------------------------------------------------------- the rows
def cuda_context(env: Device, params, world: int) -> dict:
    if not env.cuda:
        return {"what": "no CUDA device: nothing to measure"}
    torch.zeros(1, device=env.dev)
    free, total = torch.cuda.mem_get_info()
    env.context = total - free - torch.cuda.memory_reserved()
    return {"what": f"{torch.cuda.get_device_name()}, {total / GIB:.0f} GiB", "device_gib": env.context / GIB,
            "plan_device_gib": CUDA_CONTEXT / GIB}


def train_row(run: str, compiled: bool = False):
    def row(env: Device, params, world: int) -> dict:
        from flowback.plan.train import TrainRig, plan_flow_train

        exp = params.run(run)
        c = plan_flow_train(exp, world)
        rig = TrainRig(exp, world, c.checkpointing, env.dev)
        if compiled:
            rig.objective = torch.compile(rig.objective)
        t0 = time.perf_counter()
        rig.step(c.value, c.accumulation)  # the first step (torch.compile compiles here)
        env.sync()
        first = time.perf_counter() - t0
        r = env.timed(lambda: rig.step(c.value, c.accumulation), warmup=1, repeat=3)
        what = f"micro {c.value} x {c.accumulation}{' ckpt' if c.checkpointing else ''}{' compiled' if compiled else ''}"
        return {"what": what, "first_s": first, **r, **plan_columns(c.measure, world)}

    return row


def sample_row(env: Device, params, world: int) -> dict:
    from flowback.builders import flow_config
    from flowback.models.sampling import sample
    from flowback.models.tarflow import TARFlow
    from flowback.plan.sample import denoise_sigma, plan_sample
    from flowback.models.guidance import Guidance

    exp = params.run(RUNS["baseline"])
    c = plan_sample(exp, world)  # its FLOPs: sampling c.value images, every block and the denoising gradient
    sp = exp.params.sample
    model = TARFlow(flow_config(exp.params)).to(env.dev).eval().requires_grad_(False)
    y = torch.arange(c.value, device=env.dev) % model.cfg.num_classes
    dtype = torch.bfloat16 if sp.dtype == "bfloat16" else None

    def run():
        sample(model, y, guidance=Guidance.of(sp.guidance), denoise_sigma=denoise_sigma(exp), use_cache=True, dtype=dtype)

    r = env.timed(run, warmup=0, repeat=1)
    return {"what": f"batch {c.value}, KV-cached, denoise {denoise_sigma(exp) > 0}", **r,
            **plan_columns(c.measure, world)}


def classifier_row(env: Device, params, world: int) -> dict:
    from flowback.builders import flow_config
    from flowback.metrics.classifier import classify
    from flowback.models.tarflow import TARFlow
    from flowback.plan.classifier import plan_classifier

    exp = params.run(RUNS["baseline"])
    c = plan_classifier(exp, 0)
    model = TARFlow(flow_config(exp.params)).to(env.dev).eval().requires_grad_(False)
    cfg = model.cfg
    x = torch.rand(c.value, cfg.channels, cfg.image_size, cfg.image_size, device=env.dev) * 2 - 1
    r = env.timed(lambda: classify(model, x), warmup=1, repeat=3)
    return {"what": f"batch {c.value}", **r, **plan_columns(c.measure, 1)}


def ddp_row(env: Device, params, world: int) -> dict:
    """A one-process group (NCCL on a GPU, gloo on a CPU), its buffers, and the baseline's step under DDP itself
    (the plan counts DDP's gradients with ddp.py's stand-in)."""
    import torch.distributed as dist

    from flowback.plan.train import TrainRig, plan_flow_train

    used = (lambda: torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) if env.cuda else (lambda: 0)
    before = used()
    path = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "store"
    store = dist.FileStore(str(path), 1)
    dist.init_process_group("nccl" if env.cuda else "gloo", store=store, rank=0, world_size=1,
                            **({"device_id": env.dev} if env.cuda else {}))
    try:
        one = torch.ones(1, device=env.dev)
        dist.all_reduce(one)
        env.sync()
        nccl = used() - before
        exp = params.run(RUNS["baseline"])
        c = plan_flow_train(exp, max(world, 2))
        rig = TrainRig(exp, max(world, 2), c.checkpointing, env.dev, real_ddp=True)
        rig.step(c.value, c.accumulation)
        r = env.timed(lambda: rig.step(c.value, c.accumulation), warmup=1, repeat=3)
        if env.cuda:
            r["device_gib"] += nccl / GIB
        cols = plan_columns(c.measure, world)
        return {"what": f"micro {c.value} x {c.accumulation}, real DDP; NCCL (1 rank): {nccl / 2**20:.0f} MiB", **r,
                **cols, "plan_device_gib": cols["plan_device_gib"] + nccl / GIB}
    finally:
        dist.destroy_process_group()
        path.unlink(missing_ok=True)
        path.parent.rmdir()


def rows(compile_: bool) -> list[tuple[str, str, object]]:
    """(name, kind, function): the kind groups rows for --budget-s's estimate."""
    out = [("cuda context", "context", cuda_context)]
    out += [(f"train {label}", "train", train_row(run)) for label, run in RUNS.items()]
    out += [("sample", "sample", sample_row), ("classifier", "classifier", classifier_row), ("ddp + nccl", "train",
                                                                                         ddp_row)]
    if compile_:
        out.append(("train baseline compiled", "compiled", train_row(RUNS["baseline"], compiled=True)))
    return out


# ---------------------------------------------------------------------------------------------------- running
COLUMNS = [("what", "{}"), ("time_s", "{:.3g}"), ("tflop", "{:.3g}"), ("mfu", "{:.1%}"), ("alloc_gib", "{:.2f}"),
           ("plan_alloc_gib", "{:.2f}"), ("device_gib", "{:.2f}"), ("plan_device_gib", "{:.2f}"),
           ("first_s", "{:.1f}")]


def line(r: dict) -> str:
    cells = [r["row"]] + [fmt.format(r[k]) if k in r else "-" for k, fmt in COLUMNS]
    note = r.get("error") or r.get("skipped") or ""
    return "| " + " | ".join(cells + [note]) + " |"


def estimate(done: list[dict], kind: str) -> float:
    """Seconds the next row of `kind` should take: the longest of its kind so far, else of any row."""
    same = [r["row_s"] for r in done if r["kind"] == kind and "row_s" in r]
    return max(same or [r["row_s"] for r in done if "row_s" in r] or [0.0])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "profiles" / "imagenet64.yaml"))
    ap.add_argument("--config", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--out", default=None, help="directory for the rows (default results/bench/gpu_check_<device>)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile row (last)")
    ap.add_argument("--emulate-gib", type=float, default=None,
                    help="cap this process's allocator so the GPU behaves as one of this many GiB (e.g. 80 on an H200)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip rows that would not finish in this time")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    ap.add_argument("--inject-failure", default=os.environ.get("GPU_CHECK_INJECT"), metavar="ROW[:exit]",
                    help="testing: raise in the row named ROW (or end the process there, with :exit)")
    args = ap.parse_args(argv)
    env = Device()
    if env.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    params = load_params(args.params)
    if args.config == "tiny":
        params = tiny(params)
    world = world_size(params.runtime.launcher)
    out = Path(args.out or ROOT / "results" / "bench" / f"gpu_check_{'gpu' if env.cuda else 'cpu'}")
    out.mkdir(parents=True, exist_ok=True)
    inject, _, how = (args.inject_failure or "").partition(":")
    header = (f"# GPU checklist: {args.params} ({args.config}), one GPU of a {world}-GPU run, {env.dev}; MFU against "
              f"{args.peak_tflops:g} TFLOP/s\n\n| row | " + " | ".join(k for k, _ in COLUMNS) + " | note |\n|"
              + "---|" * (len(COLUMNS) + 2))
    print(header, flush=True)
    done: list[dict] = []
    start = time.perf_counter()
    for i, (name, kind, fn) in enumerate(rows(args.compile)):
        r = {"row": name, "kind": kind}
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
        need = estimate(done, kind)
        if left is not None and done and need > left:
            r["skipped"] = f"skipped: needs about {need:.0f} s, {left:.0f} s left"
        else:
            t0 = time.perf_counter()
            try:
                if name == inject:
                    if how == "exit":
                        os._exit(3)
                    raise RuntimeError("injected failure")
                if name == "cuda context" and args.emulate_gib and env.cuda:
                    r.update(fn(env, params, world))
                    total = torch.cuda.mem_get_info()[1]
                    frac = min(1.0, (args.emulate_gib * GIB - env.context) / total)
                    torch.cuda.set_per_process_memory_fraction(frac)
                    r["what"] += f"; allocator capped at {frac:.3f} of it (--emulate-gib {args.emulate_gib:g})"
                else:
                    r.update(fn(env, params, world))
                if "time_s" in r and "tflop" in r:
                    r["mfu"] = r["tflop"] * 1e12 / r["time_s"] / (args.peak_tflops * 1e12)
            except Exception as e:  # an OOM too: this row's result, not the end of the checklist
                r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            finally:
                env.clean()
            r["row_s"] = time.perf_counter() - t0
        done.append(r)
        (out / f"{i:02d}-{re.sub('[^a-z0-9]+', '_', name.lower())}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(line(r), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(done, indent=1) + "\n")
    (out / "gpu_check.md").write_text(header + "\n" + "\n".join(line(r) for r in done) + "\n")
    print(f"\nwritten to {out}/", flush=True)
    return done


if __name__ == "__main__":
    main()
