"""Shared by the bench/ scripts: time a callable and measure its peak memory, one fresh process per case.

Peak memory: on CUDA, torch's max_memory_allocated around the measured call; on CPU, the process's peak resident
set (ru_maxrss) minus its resident size just before the call, in a forked child that did nothing else, so cases
do not inherit each other's peaks. `seconds` is the best of `repeat` calls after `warmup` calls (the least
disturbed by other load on a shared machine); `median_seconds` is reported too.
"""

from __future__ import annotations

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


def _run(setup: Callable[[], Callable[[], object]], device: str, warmup: int, repeat: int, conn) -> None:
    try:
        fn = setup()
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss_bytes()
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        conn.send({"seconds": min(times), "median_seconds": statistics.median(times), "peak_bytes": max(peak, 0)})
    except Exception as e:  # report, don't hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})


def measure(setup: Callable[[], Callable[[], object]], device: str = "cpu", warmup: int = 1,
            repeat: int = 3) -> dict:
    """Run setup() then the returned callable in a child: {'seconds': median, 'peak_bytes': ...}.

    `setup` must be picklable for GPU runs (a top-level function or a functools.partial of one)."""
    # fork is cheap (torch already imported); CUDA cannot be used in a forked child, so GPU cases spawn
    ctx = mp.get_context("spawn" if device.startswith("cuda") else "fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(setup, device, warmup, repeat, child))
    proc.start()
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"
