"""Progress bars for long work: tqdm, redrawn often on a terminal and only every 10 s in logs (dvc, snakemake,
CI), so captured output stays readable. In logs a finished bar is always left in place (a cleared bar leaves the
cursor mid-line, and the next message would be glued to it)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if tty else 10.0)
    if not tty:
        kwargs["leave"] = True
    return tqdm(iterable, **kwargs)
