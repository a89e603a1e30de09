"""Measuring a grid's distinct configurations in parallel: one process per core, each planning whole runs, their
measurements merged into this process's memo, so `flowback plan` then reads them in order.

Fake-tensor measurement is Python-bound (one core each); runs that share a configuration (seeds, milestones)
share its measurements anyway (measure._memo), so the work is split by configuration, not by run.
"""

from __future__ import annotations

import multiprocessing as mp
import os

from ..params import Params
from . import measure

_STATE: dict = {}  # a worker's params, world, val_images


def _init(params: Params, world: int, val_images: int) -> None:
    _STATE.update(params=params, world=world, val_images=val_images)


def _plan_one(run: str) -> dict:
    """A worker: plan one run (its family's plan: training, sampling, classifier); return its measurements."""
    from ..families import family

    exp = _STATE["params"].run(run)
    try:
        family(exp.family).plan(exp, _STATE["world"], _STATE["val_images"])
    except measure.PlanError:
        pass  # raised again, with its message, when the table plans this run
    return measure._MEMO


def tasks(params: Params) -> list[str]:
    """One run per distinct configuration (seeds of one experiment share theirs), runs that train last (longest)."""
    distinct = {}
    for run in params.runs():
        e = params.run(run)
        distinct.setdefault(measure.config_key(e, ("sample.seed", "train.seed")), (e.trains, run))
    return [run for _, run in sorted(distinct.values())]


def prefetch(params: Params, world: int, val_images: int, jobs: int | None = None) -> None:
    """Measure every distinct configuration of the grid with `jobs` processes (default: the cores this process may
    use); a single job or a single task measures nothing here (the table does it in order)."""
    todo = tasks(params)
    jobs = min(jobs or len(os.sched_getaffinity(0)), len(todo))
    if jobs < 2:
        return
    # forkserver: forked from a fresh process that imported the planning code once (a plain fork of a process that
    # has run a backward pass cannot run another: autograd's threads)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "flowback.plan.train", "flowback.plan.sample",
                                "flowback.plan.classifier", "flowback.families.tarflow"])
    with ctx.Pool(jobs, initializer=_init, initargs=(params, world, val_images)) as pool:
        for memo in pool.imap_unordered(_plan_one, todo):
            for key, value in memo.items():
                measure._MEMO.setdefault(key, value)
