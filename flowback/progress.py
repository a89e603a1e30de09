"""Progress bars for long work: tqdm, redrawn often on a terminal and only every 10 s in logs (dvc, snakemake,
CI), so captured output stays readable."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, **kwargs)
