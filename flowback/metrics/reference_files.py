"""Where the reference statistics live (`{metrics.dir}/reference/<name>.npz` and `reference.json`): a module of its own
so that declaring the stages that write and read them does not load torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..params import Params

REFERENCE_DIR = "reference"
REPORT_FILE = "reference.json"


def reference_name(params: "Params") -> str:
    """`<dataset>-<split>` for a split of the prepared data, the file's stem for an ADM reference batch."""
    mp = params.metrics
    if mp.reference_batch:
        return Path(mp.reference_batch).stem
    return f"{params.data.dataset}-{mp.reference_split}"


def reference_path(params: "Params") -> Path:
    return Path(params.metrics.dir) / REFERENCE_DIR / f"{reference_name(params)}.npz"


def report_path(params: "Params") -> Path:
    return Path(params.metrics.dir) / REPORT_FILE
