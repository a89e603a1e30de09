"""Where a stage computes: the device, CPU threads and float32 matmul precision, all from `runtime:` in params.

Every stage calls `configure(params.runtime)` first, so dvc and snakemake (which start the same commands) compute with
the same settings and a machine gives the same numbers whichever engine runs it. Nothing is read from the environment
(OMP_NUM_THREADS included), except torchrun's rank variables (flowback/distributed.py) and, for a warning only,
OMP_WAIT_POLICY.

The thread count is kept as asked even on a busy machine: it changes the numbers (1 and 2 threads give weights that
differ by 2e-6 after three steps of the default profile), so it must not follow the load. What a busy machine
breaks is OpenMP's default wait: a thread whose peer lost its core spins at every barrier until the peer runs again
(the default profile's step, 2 threads beside one busy process: 0.12 s/step with OMP_WAIT_POLICY=PASSIVE, 4.1 s/step
without; the same weights, bit for bit: docs/benchmarks.md). The policy is read once, when torch loads OpenMP, so it
must be in the environment of the command; `configure` says so, in one line, when it sees the risk.
"""

from __future__ import annotations

import os
import sys

import torch

from .errors import ParamsError
from .params.schema import RuntimeParams


def device(name: str) -> torch.device:
    """'auto' -> cuda if present else cpu; 'cuda' without a GPU is a params error (one line, before any work)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("runtime.device: 'cuda', but this machine has no CUDA device (torch "
                          f"{torch.__version__}, cuda {torch.version.cuda or 'not built'}); use auto or cpu")
    return torch.device(name)


def spin_warning(threads: int, usable: int, load: float, policy: str | None) -> str | None:
    """The warning for `threads` OpenMP threads on `usable` cores with load average `load` (others' processes, and
    perhaps half of this young one), when the wait policy is not passive; None when there is no risk."""
    if threads <= 1 or (policy or "").lower() == "passive" or load + threads <= usable + 0.5:
        return None
    return (f"flowback: warning: runtime.threads {threads} on {usable} usable cores with load {load:.1f}: OpenMP "
            f"threads spin while a peer waits for a core (2 threads beside one busy process: 4.1 instead of 0.12 s "
            f"per step, docs/benchmarks.md); start the command with OMP_WAIT_POLICY=PASSIVE (same numbers) or set "
            f"runtime.threads: 1")


def configure(rt: RuntimeParams) -> torch.device:
    """Apply threads and TF32 settings; return the device to compute on."""
    dev = device(rt.device)
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    threads = torch.get_num_threads()
    warning = spin_warning(threads, len(os.sched_getaffinity(0)), os.getloadavg()[0], os.environ.get("OMP_WAIT_POLICY"))
    if warning and dev.type == "cpu":
        print(warning, file=sys.stderr, flush=True)
    # TF32 tensor cores for float32 matmuls/convolutions (bf16 autocast is unaffected); a param turns it off for
    # bit-faithful fp32 comparisons.
    torch.backends.cuda.matmul.allow_tf32 = rt.tf32
    torch.backends.cudnn.allow_tf32 = rt.tf32
    return dev
