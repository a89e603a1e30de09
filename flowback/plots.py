"""Figures people would rather look at than read: training curves of every experiment on one page."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .io import write_bytes  # noqa: E402


def training_curves(logs: dict[str, Path], out: str | Path) -> None:
    """bits/dim and alignment loss against step, one line per experiment."""
    fig, (ax_bpd, ax_align) = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in logs.items():
        df = pd.read_csv(path)
        ax_bpd.plot(df["step"], df["bpd"], label=name)
        if (df["align"] != 0).any():
            ax_align.plot(df["step"], df["align"], label=name)
    ax_bpd.set(xlabel="step", ylabel="bits/dim (noisy training data)", title="Negative log-likelihood")
    ax_align.set(xlabel="step", ylabel="-cos(proj(h), encoder)", title="Alignment loss")
    for ax in (ax_bpd, ax_align):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(out, buf.getvalue())
