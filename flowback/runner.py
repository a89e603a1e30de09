"""What `python -m flowback stage NAME [RUN]` does around a stage's `run`: params validation, the one config object,
the run lock, the key file, and clean error exits.

1. The stage's name, the run (`<experiment>-s<seed>`, for per-run stages), `--params` (default params.yaml).
2. Validate every key of the params file (a bad one is one line naming it, exit 2) and build the stage's config:
   the params, or the merged run (flowback.params.Experiment), restricted to the keys the stage declares.
3. Under DVC, check that dvc.yaml is the one flowback.pipeline generates (else DVC would rerun the wrong things).
4. Hold an exclusive lock on the run directory (or the stage's lock in <results>/.locks): a second runner, from either
   engine, stops with a message naming the holder instead of writing the same files.
5. Run; on success write the stage's key file (flowback.pipeline), print the stage's summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import FlowBackError, Interrupted, ParamsError
from .params import Experiment, Params, check_working_directory, load_params, restrict


# where a Ctrl-C must wait: torch's zip writer, interrupted mid-record, raises a RuntimeError from its cleanup that
# hides the KeyboardInterrupt (a traceback instead of the resume line), and flowback's atomic writers
_WRITERS = (f"{os.sep}torch{os.sep}serialization.py", f"{os.sep}flowback{os.sep}io.py")


@contextlib.contextmanager
def ctrl_c_between_writes() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual, except inside a file write: there it is delivered again 50 ms later,
    until it lands between writes. A SIGINT that is ignored (a job started in the background) stays ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def interrupt(signum, frame):
        f = frame
        while f is not None:
            if f.f_code.co_filename.endswith(_WRITERS):
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
                return
            f = f.f_back
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    """One lock per stage instance: two stages of one run (its sweep and its probe, say) write different files and may
    run at once (snakemake -j2); two runners of the same instance may not."""
    if isinstance(cfg, Experiment):
        return cfg.run_dir / f".{stage}.lock"
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


def main(name: str, run: str | None, params_file: str = "params.yaml", progress: bool = True) -> int:
    """`python -m flowback stage NAME [RUN]`: input errors exit 2 with one line, before any work."""
    from .distributed import env
    from .pipeline import Pipeline
    from .stages import stage

    st = stage(name)
    try:
        params = load_params(params_file)
        if st.per_run and run is None:
            raise ParamsError(f"stage {name} runs once per run of the grid: name one ({', '.join(params.runs())})")
        if not st.per_run and run is not None:
            raise ParamsError(f"stage {name} runs once for the whole grid: it takes no run ({run!r})")
        run = params.resolve_run(run) if st.per_run else None
        cfg = params.run(run) if st.per_run else params
        if not st.enabled(params):
            raise ParamsError(f"{params_file}: {st.switch} is off (false or empty), so stage {name} is not part of this "
                              f"pipeline; "
                              f"nothing was run")
        if run and not st.applies(cfg):
            raise ParamsError(f"run {run!r} has no {name} stage")
        check_working_directory(params, params_file, st.reads(cfg))  # the file as written, not the merged run
        pipeline = Pipeline(params, params_file)
        check_under_dvc(pipeline)
        rank = env()[0]
        lock = run_lock(lock_path(params, cfg, name), f"{name} {run or ''}".strip()) if rank == 0 \
            else contextlib.nullcontext()
        with lock, ctrl_c_between_writes():
            summary = st.run(restricted(cfg, st.reads(cfg), name), progress)
        if rank == 0:
            pipeline.write_stamp(pipeline.instance(name, run))
        if summary:
            print(summary)
        return 0
    except Interrupted as e:  # a stage that knows where it stopped (train)
        print(f"flowback stage {name}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outputs are replaced whole, so nothing is half-written: say what a rerun reuses
        then = f"rerun resumes from {st.resumes}" if st.resumes else "rerun starts it over"
        print(f"flowback stage {name}: interrupted; {then}", file=sys.stderr)
        return 130
    except FlowBackError as e:
        print(f"flowback stage {name}: error: {e}", file=sys.stderr)
        return 2
