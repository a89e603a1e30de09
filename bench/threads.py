"""Benchmark: the default profile's training step with 1 or 2 torch threads, alone and beside a busy process, with
OpenMP's default (spinning) wait, a passive one, or a passive one set too late (after torch loaded OpenMP), each in
a fresh process.

A thread of an OpenMP team that another process has taken the core from makes the others spin at the next barrier
until it runs again; a step of many small ops meets thousands of barriers. Steps run for about --seconds each (at
least 3), on the real training code (flowback.plan.train.TrainRig, CPU tensors, params.yaml's baseline); s/step is
their median. `weights` is a hash of the weights after 3 seeded steps: the wait policy must not change it.

  python bench/threads.py                 # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"


def child(threads: int, seconds: float, late: bool) -> None:
    """In a fresh process: time training steps; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    import hashlib

    import torch

    from flowback.params import load_params
    from flowback.plan.train import TrainRig

    if late:  # OpenMP has read its settings when torch loaded: this changes nothing
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(threads)
    params = load_params(str(ROOT / "params.yaml"))
    exp = params.run("baseline-s0")
    torch.manual_seed(0)
    rig = TrainRig(exp, 1, False, torch.device("cpu"))
    share = exp.params.train.batch_size
    for _ in range(3):
        rig.step(share, 1)
    weights = torch.cat([p.detach().flatten() for p in rig.state.parameters()]).numpy().tobytes()
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        rig.step(share, 1)
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"s_per_step": times[len(times) // 2], "steps": len(times), "threads": torch.get_num_threads(),
                      "weights": hashlib.sha256(weights).hexdigest()[:12]}))


def case(threads: int, policy: str | None, busy: int, seconds: float, late: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        cmd = [sys.executable, __file__, "--child", str(threads), "--seconds", str(seconds)]
        out = subprocess.run(cmd + (["--late"] if late else []), env=env, capture_output=True, text=True,
                             check=True).stdout
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {**json.loads(out.strip().splitlines()[-1]), "busy": busy}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--late", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.child, args.seconds, args.late)
        return []
    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; load average {os.getloadavg()[0]:.2f} "
          f"at the start\n\n| threads | OMP_WAIT_POLICY | busy processes | s/step | steps | weights |\n"
          f"|---|---|---|---|---|---|")
    rows = []
    for busy in (0, 1):
        for threads, policy, late in ((1, None, False), (2, None, False), (2, "PASSIVE", False), (2, None, True)):
            r = case(threads, policy, busy, args.seconds, late)
            label = "PASSIVE, set after torch loaded" if late else (policy or "default")
            rows.append({**r, "label": label})
            print(f"| {r['threads']} | {label} | {busy} | {r['s_per_step']:.4f} | {r['steps']} | {r['weights']} |",
                  flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return rows


if __name__ == "__main__":
    main()
