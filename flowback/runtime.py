"""Where a stage computes: the device, CPU threads and float32 matmul precision, all from `runtime:` in params.

Every stage calls `configure(params.runtime)` first, so dvc and snakemake (which start the same commands) compute with
the same settings and a machine gives the same numbers whichever engine runs it. Nothing is read from the environment
(OMP_NUM_THREADS included), except torchrun's rank variables (flowback/distributed.py).
"""

from __future__ import annotations

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


def configure(rt: RuntimeParams) -> torch.device:
    """Apply threads and TF32 settings; return the device to compute on."""
    dev = device(rt.device)
    if rt.threads > 0:
        torch.set_num_threads(rt.threads)
    # TF32 tensor cores for float32 matmuls/convolutions (bf16 autocast is unaffected); a param turns it off for
    # bit-faithful fp32 comparisons.
    torch.backends.cuda.matmul.allow_tf32 = rt.tf32
    torch.backends.cudnn.allow_tf32 = rt.tf32
    return dev
