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


def _plan_one(task: tuple[str, str]) -> dict:
    """A worker: plan one run's training (`train`) or sampling and classifier (`infer`); return its measurements."""
    from .classifier import plan_classifier
    from .sample import plan_sample
    from .train import plan_af_train, plan_flow_train

    kind, run = task
    exp, world = _STATE["params"].run(run), _STATE["world"]
    try:
        if kind == "train":
            (plan_af_train if exp.family == "af" else plan_flow_train)(exp, world)
        else:
            plan_sample(exp, world)
            plan_classifier(exp, _STATE["val_images"])
    except measure.PlanError:
        pass  # raised again, with its message, when the table plans this run
    return measure._MEMO


def tasks(params: Params) -> list[tuple[str, str]]:
    """One task per distinct configuration: sampling / classifier ones first (short), then training ones."""
    from .sample import _NOT_READ

    infer, train = {}, {}
    for run in params.runs():
        e = params.run(run)
        if e.family != "af":
            infer.setdefault(measure.config_key(e, _NOT_READ, strategy=False), ("infer", run))
        if e.trains:
            train.setdefault(measure.config_key(e, ("sample", "metrics", "af")), ("train", run))
    return list(infer.values()) + list(train.values())


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
                                "flowback.plan.classifier"])
    with ctx.Pool(jobs, initializer=_init, initargs=(params, world, val_images)) as pool:
        for memo in pool.imap_unordered(_plan_one, todo):
            for key, value in memo.items():
                measure._MEMO.setdefault(key, value)
