"""Figures people would rather look at than read: training curves and sample grids of every experiment on one page."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .io import write_bytes  # noqa: E402

import numpy as np  # noqa: E402


def _colours(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def training_curves(logs: dict[str, list[Path]], out: str | Path) -> None:
    """bits/dim and alignment loss against step: one colour per experiment (the same in both panels), one line per
    training seed."""
    fig, (ax_bpd, ax_align) = plt.subplots(1, 2, figsize=(11, 4))
    colours = _colours(list(logs))
    for name, paths in logs.items():
        for i, path in enumerate(paths):
            df = pd.read_csv(path)
            label = name if i == 0 else None
            ax_bpd.plot(df["step"], df["bpd"], color=colours[name], label=label, lw=1)
            if (df["align"] != 0).any():
                ax_align.plot(df["step"], df["align"], color=colours[name], label=label, lw=1)
    ax_bpd.set(xlabel="step", ylabel="bits/dim (noisy training data)", title="Negative log-likelihood")
    ax_align.set(xlabel="step", ylabel="-cos(proj(h), encoder)", title="Alignment loss")
    for ax in (ax_bpd, ax_align):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out)


def sample_panels(panels: list[tuple[str, "np.ndarray"]], out: str | Path, columns: int = 4) -> None:
    """One panel per experiment: its sample grid (rows = classes) under a title (name, FID, class fidelity)."""
    import math

    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, grid) in zip(axes.flat, panels):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(out, buf.getvalue())


def save_png(path: str | Path, image_hwc: "np.ndarray") -> None:
    """A uint8 HxWxC (C = 1 or 3) array as a PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def image_grid(images_nhwc: np.ndarray, labels: np.ndarray, num_classes: int, per_row: int = 10) -> np.ndarray:
    """One row per class (up to per_row samples each), uint8 HxWxC with a 1-pixel gap."""
    n, h, w, ch = images_nhwc.shape
    grid = np.full((num_classes * (h + 1) + 1, per_row * (w + 1) + 1, ch), 255, dtype=np.uint8)
    for k in range(num_classes):
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_row]):
            grid[1 + k * (h + 1) : 1 + k * (h + 1) + h, 1 + j * (w + 1) : 1 + j * (w + 1) + w] = images_nhwc[i]
    return grid


def metric_lines(runs: dict[str, list[Path]], x: str, y: str, out: str | Path, xlabel: str, ylabel: str,
                 title: str) -> None:
    """`y` against `x` from each run's CSV: one colour per experiment, its mean over seeds as a line with markers and
    its seeds' range shaded (the figures of the paper's Figure 5)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = _colours(list(runs))
    for name, paths in runs.items():
        frames = [pd.read_csv(path)[[x, y]] for path in paths]
        table = pd.concat(frames).groupby(x)[y]
        mean, low, high = table.mean(), table.min(), table.max()
        ax.plot(mean.index, mean.values, marker="o", ms=3, lw=1.2, color=colours[name],
                label=f"{name} ({len(frames)} seed{'s' if len(frames) > 1 else ''})")
        if len(frames) > 1:
            ax.fill_between(mean.index, low.values, high.values, color=colours[name], alpha=0.15, lw=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out)
