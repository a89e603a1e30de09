"""What every `python -m stages.X` command does around its stage's `run`: arguments, params validation, the one
config object, the run lock, the key file, and clean error exits.

1. Parse `--params` (default params.yaml), `--experiment <experiment>-s<seed>` for per-run stages, `--quiet`.
2. Validate every key of the params file (a bad one is one line naming it, exit 2) and build the stage's config:
   the params, or the merged run (flowback.params.Experiment), restricted to the keys the stage declares.
3. Under DVC, check that dvc.yaml is the one flowback.pipeline generates (else DVC would rerun the wrong things).
4. Hold an exclusive lock on the run directory (or the stage's lock in <results>/.locks): a second runner, from either
   engine, stops with a message naming the holder instead of writing the same files.
5. Run; on success write the stage's key file (flowback.pipeline), print the stage's summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import FlowBackError
from .params import Experiment, Params, ParamsError, load_params, restrict


class LockedError(FlowBackError):
    """Another process is running the same stage on the same outputs."""


@contextlib.contextmanager
def run_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` (fcntl: released by the kernel if the holder dies); the holder's pid, host, command
    and start time go beside it, so the refusal names who holds it."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_name(path.name + ".holder")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            h = json.loads(holder.read_text())
            who = f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise LockedError(f"{what} is being run by {who}; wait for it to finish (its lock is {path})") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def lock_path(params: Params, cfg: Params | Experiment, stage: str) -> Path:
    if isinstance(cfg, Experiment):
        return cfg.run_dir / ".lock"
    return params.results_dir / ".locks" / f"{stage}.lock"


def restricted(cfg: Params | Experiment, keys: list[str], stage: str) -> Params | Experiment:
    """The stage's one config object, in which only its declared keys can be read."""
    if isinstance(cfg, Experiment):
        return cfg.model_copy(update={"params": restrict(cfg.params, keys, stage)})
    return restrict(cfg, keys, stage)


def check_under_dvc(pipeline) -> None:
    """When DVC runs this stage, refuse a dvc.yaml that is not the generated one."""
    if "DVC_STAGE" not in os.environ:
        return
    from .pipeline import check_dvc_file

    problem = check_dvc_file(pipeline, Path(os.environ.get("DVC_ROOT", ".")) / "dvc.yaml")
    if problem:
        raise FlowBackError(f"{problem}: it no longer matches params.yaml or the code; run `python -m flowback "
                            f"pipeline` (it rewrites dvc.yaml), then `dvc repro`")


def main(stage: str, argv: list[str] | None = None) -> None:
    """The `python -m stages.<stage>` command; input errors exit 2 with one line, before any work."""
    from .jobs import job

    mod = job(stage)
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=(mod.__doc__ or "").split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if mod.PER_RUN:
        # not `--run`: torchrun would take it for an abbreviation of its own --run-path
        parser.add_argument("--experiment", required=True, metavar="RUN",
                            help="a run of the grid: <experiment>-s<seed>, e.g. baseline-s0 (or just the experiment's "
                                 "name when it has one seed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        from .distributed import env
        from .pipeline import Pipeline

        params = load_params(args.params)
        run = params.resolve_run(args.experiment) if mod.PER_RUN else None
        cfg = params.run(run) if mod.PER_RUN else params
        if run and not getattr(mod, "applies", lambda _: True)(cfg):
            raise ParamsError(f"run {run!r} has no {stage} stage: it reads experiments.{cfg.milestone.of}'s "
                              f"milestone at step {cfg.milestone.step}")
        pipeline = Pipeline(params, args.params)
        check_under_dvc(pipeline)
        rank = env()[0]
        lock = run_lock(lock_path(params, cfg, stage), f"{stage} {run or ''}".strip()) if rank == 0 \
            else contextlib.nullcontext()
        with lock:
            summary = mod.run(restricted(cfg, mod.reads(cfg), stage), progress=not args.quiet)
        if rank == 0:
            pipeline.write_stamp(pipeline.instance(stage, run))
        if summary:
            print(summary)
    except FlowBackError as e:
        print(f"stages.{stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
