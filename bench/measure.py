"""Shared by the bench/ scripts: time a callable and measure its peak memory, one fresh process per case.

Peak memory: on CUDA, torch's max_memory_allocated around the measured call; on CPU, the process's peak resident
set (ru_maxrss) minus its resident size just before the call, in a child (forked from a clean fork server) that did
nothing else, so cases do not inherit each other's peaks. `seconds` is the best of `repeat` calls after `warmup` calls (the least
disturbed by other load on a shared machine); `median_seconds` is reported too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from typing import Callable

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _run(setup: Callable[[], Callable[[], object]], device: str, warmup: int, repeat: int, conn) -> None:
    try:
        fn = setup()
        _sync(device)
        # the first call is the memory measurement; with warmup=0 it is also the first timed call (slow cases run once)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            first = _timed(fn, device)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_bytes()
            first = _timed(fn, device)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = [] if warmup else [first]
        for _ in range(max(warmup - 1, 0)):
            fn()
        while len(times) < repeat:
            times.append(_timed(fn, device))
        conn.send({"seconds": min(times), "median_seconds": statistics.median(times), "peak_bytes": max(peak, 0)})
    except Exception as e:  # report, don't hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})


def measure(setup: Callable[[], Callable[[], object]], device: str = "cpu", warmup: int = 1,
            repeat: int = 3) -> dict:
    """Run setup() then the returned callable in a child: {'seconds': median, 'peak_bytes': ...}.

    `setup` must be picklable: a top-level function or a functools.partial of one."""
    # Not plain fork: a child forked from a process whose OpenMP pool (or CUDA) is already running can hang.
    # A fork server is a fresh process that imports torch once and forks each case from that clean state.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "flowback.models", "flowback.alignment", "flowback.training"])
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(setup, device, warmup, repeat, child))
    proc.start()
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def bench_parser(doc: str, configs: dict) -> argparse.ArgumentParser:
    """The options every bench script shares: --quick, --config, --device, --dtype."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU config, finishes in well under 45 s")
    ap.add_argument("--config", choices=list(configs), default=None, help="default: quick with --quick, else cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return ap


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"
