"""Benchmark: Jacobi and GS-Jacobi sampling against the KV-cached sequential solver, same model, same noise.

Speed rows, each solver timed in its own process (bench/measure.py), all on the same noise:
- model "digits32": the sampling bench's quick architecture (2 blocks x 1 layer, width 48, patch 1) on the real digits
  upsampled to 32x32 (one channel: 32 x 32 = 1024 tokens), trained briefly here (cached in bench/out/) so that its
  blocks are far from the identity a zero-initialised flow is (that one converges in one pass and proves nothing).
  No guidance, no denoising. Batch 1 (one image: the latency regime parallel decoding is for) and batch 4 (the
  sampling bench's batch). Each row: images/s, speedup over sequential, max abs difference from the sequential
  sample (model space, pixels in [-1, 1]), parallel passes per block, sequential fallbacks.
- FID: the default profile's baseline (results/runs/baseline-s0/model.pt: 16 tokens, 8 blocks) sampled like the sample
  stage, unguided (100 per class, batch 500, the stage's per-chunk generators, denoising at noise_std 0.05) with each
  solver, and its FID against the digits reference with the project's metric network (the evaluate stage's code).
The gs_jacobi plans come from GS-Jacobi's block metrics (CRM, IGM) on 256 training images.
The last line is `jacobi speedup: N (max abs diff D)`: the faster parallel solver at batch 1 on digits32, by
wall-clock time (by CPU time with --threads 1).
Timed processes use --threads torch threads (default 0: torch's default, every core; a parallel pass uses them, a
token step of the sequential solver is too small to). On a machine shared with other jobs, --threads 1 measures the
solver rather than the scheduler: the table then also gives each solver's best process CPU time, the solvers
interleaved in one process, which is what a one-thread run's wall time would be on an idle machine.

  python bench/jacobi.py --quick     # CPU; the first run also trains the 1024-token model (a few minutes, cached)
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from measure import bench_parser, measure, mib  # noqa: E402

from flowback.checkpoints import load_flow, save_flow  # noqa: E402
from flowback.models.jacobi import Solver, block_metrics, gs_plan  # noqa: E402
from flowback.models.sampling import SampleStats, sample  # noqa: E402
from flowback.models.tarflow import FlowConfig, TARFlow  # noqa: E402

OUT = ROOT / "bench" / "out"
CONFIGS = {
    # the sampling bench's quick architecture (1024 tokens), on one-channel 32x32 digits
    "quick": dict(flow=dict(channels=1, image_size=32, patch_size=1, width=48, layers=(1, 1), head_dim=16,
                            mlp_ratio=2, num_classes=10), batch=4, train_steps=300, train_batch=32, lr=3e-3,
                  noise_std=0.05, tol=1e-4, max_iters=64, segments=16, tough_ratio=3.0, window=128),
    "cpu": dict(flow=dict(channels=1, image_size=32, patch_size=1, width=64, layers=(2,) * 4, head_dim=16,
                          mlp_ratio=4, num_classes=10), batch=8, train_steps=600, train_batch=32, lr=2e-3,
                noise_std=0.05, tol=1e-4, max_iters=64, segments=16, tough_ratio=3.0, window=128),
}


def digits(size: int):
    from flowback.data.digits import load_digits_images
    from flowback.data.images import to_model

    images, labels = load_digits_images(size)
    return to_model(torch.from_numpy(images)), torch.from_numpy(labels)


def trained_model(config: str, steps: int | None = None) -> TARFlow:
    """The config's flow trained briefly on the real digits (AdamW, Gaussian dequantisation noise, cosine lr),
    cached in bench/out/ keyed by its settings."""
    c = CONFIGS[config]
    steps = c["train_steps"] if steps is None else steps
    key = json.dumps({**c["flow"], "steps": steps, "batch": c["train_batch"], "lr": c["lr"], "noise": c["noise_std"]},
                     sort_keys=True)
    path = OUT / f"jacobi_{config}_{abs(hash_text(key)):x}.pt"
    if path.exists():
        return load_flow(path)[0]
    torch.manual_seed(0)
    model = TARFlow(FlowConfig(**c["flow"]))
    x_all, y_all = digits(c["flow"]["image_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], betas=(0.9, 0.95), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c["lr"], total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x_all), (c["train_batch"],), generator=g)
        x = x_all[idx] + c["noise_std"] * torch.randn(x_all[idx].shape, generator=g)
        y = torch.where(torch.rand(len(idx), generator=g) < 0.1, -1, y_all[idx])
        loss = model.nll_per_dim(model(x, y))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    print(f"trained {config} model: {steps} steps in {time.perf_counter() - t0:.0f} s, final loss {loss.item():.3f} "
          f"nats/dim", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    save_flow(path, model)
    return model.eval()


def hash_text(s: str) -> int:
    import hashlib

    return int(hashlib.sha256(s.encode()).hexdigest()[:12], 16)


def plan(model: TARFlow, size: int, c: dict) -> Solver:
    x, y = digits(size)
    metrics = block_metrics(model, x[:256], y[:256])
    return gs_plan(metrics, tol=c["tol"], max_iters=c["max_iters"], tough_ratio=c["tough_ratio"],
                   tough_segments=c["segments"], tough_max_iters=c["max_iters"]), metrics


def setup_speed(config: str, solver: dict, batch: int, threads: int = 0):
    """One solver's sampling call on the trained 1024-token model (a batch of `batch` images, fixed noise)."""
    import warnings

    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # fallbacks are counted in the table
    model = trained_model(config)
    y = torch.arange(batch) % model.cfg.num_classes
    z = torch.randn(batch, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(7))
    s = Solver(**solver)
    return lambda: sample(model, y, z=z, solver=s)


def run_solver(model, solver: Solver, y, z, **kw):
    stats = SampleStats()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = sample(model, y, z=z, solver=solver, stats=stats, **kw)
    return x, stats


def fid_rows(solvers: dict[str, Solver], results: Path) -> list[dict]:
    """The default profile's baseline sampled with each solver (the sample stage's settings) and its FID."""
    from flowback.checkpoints import load_flow
    from flowback.data.images import to_uint8
    from flowback.metrics.generative import extract_features, load_feature_network
    from flowback.metrics.reference import load_reference
    from flowback.sampler import sample_labels

    model, _ = load_flow(results / "runs" / "baseline-s0" / "model.pt")
    net = load_feature_network("digitnet", results / "encoders" / "metric")
    ref = load_reference(results / "encoders" / "metric" / "reference" / "digits-train.npz")
    labels = torch.from_numpy(sample_labels(10, 100))
    rows, base = [], None
    for name, solver in solvers.items():
        images, seconds, stats = [], 0.0, SampleStats()
        for c, start in enumerate(range(0, len(labels), 500)):
            g = torch.Generator().manual_seed(1 * 1_000_003 + c)  # the sample stage's per-chunk generator
            y = labels[start : start + 500]
            z = torch.randn(len(y), model.cfg.num_tokens, model.cfg.token_dim, generator=g)
            t0 = time.perf_counter()
            x, st = run_solver(model, solver, y, z, denoise_sigma=0.05)
            seconds += time.perf_counter() - t0
            images.append(x)
            for k, v in st.passes.items():
                stats.passes[k] += v
        x = torch.cat(images)
        feats = extract_features(net, to_uint8(x).numpy(), 256, show_progress=False)
        fid = ref.metrics(feats)["fid"]
        base = x if base is None else base
        n = len(images)  # passes per 500-image batch, averaged over the batches
        rows.append(dict(solver=name, fid=fid, seconds=seconds, max_abs_diff=(x - base).abs().max().item(),
                         passes={k: round(v / n, 1) for k, v in sorted(stats.passes.items())}))
    return rows


def cpu_seconds(config: str, solvers: dict[str, Solver], batch: int, rounds: int = 5) -> dict[str, float]:
    """Best process CPU time of each solver's call, the solvers interleaved round by round in this process: on a
    machine shared with other jobs, CPU time of a one-thread run is what its wall time would be on an idle one."""
    import warnings

    model = trained_model(config)
    y = torch.arange(batch) % model.cfg.num_classes
    z = torch.randn(batch, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(7))
    best = {name: float("inf") for name in solvers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, s in solvers.items():  # warm-up
            sample(model, y, z=z, solver=s)
        for _ in range(rounds):
            for name, s in solvers.items():
                t0 = time.process_time()
                sample(model, y, z=z, solver=s)
                best[name] = min(best[name], time.process_time() - t0)
    return best


def speed_rows(config: str, solvers: dict[str, Solver], batch: int, device: str, threads: int) -> dict:
    c = CONFIGS[config]
    model = trained_model(config)
    y = torch.arange(batch) % c["flow"]["num_classes"]
    z = torch.randn(batch, model.cfg.num_tokens, model.cfg.token_dim, generator=torch.Generator().manual_seed(7))
    ref, _ = run_solver(model, Solver(), y, z)
    rows = {}
    for name, s in solvers.items():
        x, stats = run_solver(model, s, y, z)
        r = measure(functools.partial(setup_speed, config, s.to_dict(), batch, threads), device, warmup=1, repeat=5)
        calls = sum(stats.passes.values()) + sum(stats.sequential_steps.values()) if s.method != "sequential" else \
            len(model.blocks) * (model.cfg.num_tokens - 1)
        rows[name] = dict(r, diff=(x - ref).abs().max().item(), passes=dict(sorted(stats.passes.items())),
                          fallbacks=sum(stats.fallbacks.values()), batch=batch, calls=calls)
    if threads == 1 and device == "cpu":
        for name, sec in cpu_seconds(config, solvers, batch).items():
            rows[name]["cpu_seconds"] = sec
    return rows


def main(argv=None) -> float:
    ap = bench_parser(__doc__, CONFIGS)
    ap.add_argument("--results", default=str(ROOT / "results"), help="results dir with the default profile's "
                    "runs/baseline-s0/model.pt and encoders/metric (default: this checkout's)")
    ap.add_argument("--no-fid", action="store_true", help="skip the default-profile FID rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each timed process (0: torch's default)")
    args = ap.parse_args(argv)
    config = args.config or ("quick" if args.quick else "cpu")
    c = CONFIGS[config]
    f = c["flow"]
    tokens = (f["image_size"] // f["patch_size"]) ** 2
    model = trained_model(config)
    gs, metrics = plan(model, f["image_size"], c)
    threads = args.threads or torch.get_num_threads()
    print(f"config {config}: {len(f['layers'])} blocks x {f['layers'][0]} layers, width {f['width']}, {tokens} tokens,"
          f" {args.device}, {threads} thread(s) per timed process on a {os.cpu_count()}-core machine; model "
          f"digits32: trained {c['train_steps']} steps on 32x32 digits")
    print("block metrics: " + "; ".join(f"block {m.block}: CRM {m.crm:.2f}, IGM noise {m.igm['noise']:.3f} / zeros "
                                        f"{m.igm['zeros']:.3f}" for m in metrics))
    solvers = {
        "sequential (KV cache)": Solver(),
        "jacobi": Solver("jacobi", tol=c["tol"], max_iters=tokens),
        "gs_jacobi (CRM/IGM plan)": gs,
        f"gs_jacobi (window {c['window']})": Solver("gs_jacobi", tol=c["tol"], window=c["window"],
                                                     max_iters=c["window"]),
        # Jacobi over the whole block that commits its converged leading tokens and stops recomputing them
        "gs_jacobi (window = block)": Solver("gs_jacobi", tol=c["tol"], window=tokens, max_iters=tokens),
    }
    table = {b: speed_rows(config, solvers, b, args.device, args.threads) for b in (1, c["batch"])}
    cpu = all("cpu_seconds" in r for rows in table.values() for r in rows.values())
    print("\n| solver | model | batch | time / batch (s) | images/s | speedup | CPU s / batch | speedup (CPU time) | "
          "max abs diff | passes per block | fallbacks | ms per transformer call | peak (MiB) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b, rows in table.items():
        seq, seq_cpu = rows["sequential (KV cache)"]["seconds"], rows["sequential (KV cache)"].get("cpu_seconds")
        for name, r in rows.items():
            passes = "-" if name.startswith("sequential") else ", ".join(f"{k}:{v}" for k, v in r["passes"].items())
            cpu_cols = f"{r['cpu_seconds']:.3f} | {seq_cpu / r['cpu_seconds']:.2f}" if cpu else "- | -"
            print(f"| {name} | digits32 ({tokens} tokens) | {b} | {r['seconds']:.3f} | {b / r['seconds']:.2f} | "
                  f"{seq / r['seconds']:.2f} | {cpu_cols} | {r['diff']:.1e} | {passes} | {r['fallbacks']} | "
                  f"{1000 * (r['cpu_seconds'] if cpu else r['seconds']) / r['calls']:.2f} | "
                  f"{mib(r['peak_bytes'])} |")
    print("(a transformer call: one token step of the sequential solver, one parallel pass of the others; Jacobi wins "
          "when its passes per block times the cost of a pass in steps stays below the tokens per block)")
    print(f"gs_jacobi plan: segments {gs.segments}, max_iters {gs.max_iters}, init {gs.init}, tol {gs.tol:g}")
    results = Path(args.results)
    if not args.no_fid and (results / "runs" / "baseline-s0" / "model.pt").exists():
        from flowback.checkpoints import load_flow

        base, _ = load_flow(results / "runs" / "baseline-s0" / "model.pt")
        gs16, m16 = plan(base, base.cfg.image_size, dict(c, segments=4))
        print("baseline block metrics: " + "; ".join(f"block {m.block}: CRM {m.crm:.2f}" for m in m16))
        fid = fid_rows({"sequential (KV cache)": Solver(), "jacobi": Solver("jacobi", tol=c["tol"], max_iters=16),
                        "gs_jacobi (CRM/IGM plan)": gs16}, results)
        print("\nFID on the default profile (results/runs/baseline-s0/model.pt, 16 tokens, 1000 samples, batch 500, "
              "denoised):")
        print("\n| solver | FID | FID change | seconds (1000 images) | max abs diff | passes per block and batch |\n"
              "|---|---|---|"
              "---|---|---|")
        for r in fid:
            print(f"| {r['solver']} | {r['fid']:.3f} | {r['fid'] - fid[0]['fid']:+.4f} | {r['seconds']:.2f} | "
                  f"{r['max_abs_diff']:.1e} | {', '.join(f'{k}:{v}' for k, v in r['passes'].items()) or '-'} |")
    elif not args.no_fid:
        print(f"\nFID rows skipped: no {results / 'runs' / 'baseline-s0' / 'model.pt'} (run the default profile first)")
    rows = table[1]
    key = "cpu_seconds" if cpu else "seconds"
    best = min((k for k in rows if not k.startswith("sequential")), key=lambda k: rows[k][key])
    speedup = rows["sequential (KV cache)"][key] / rows[best][key]
    print(f"\nfastest parallel solver at batch 1: {best} (speedup by {'CPU' if cpu else 'wall-clock'} time)")
    print(f"jacobi speedup: {speedup:.2f} (max abs diff {rows[best]['diff']:.1e})")
    return speedup


if __name__ == "__main__":
    main()
