"""Paper-style result tables from the metrics JSON files: pandas in, Markdown and CSV out.

One row per experiment. An experiment trained at several seeds shows the mean and the standard deviation over its
seeds (`mean ± std`, sample std, n-1) and how many seeds ran; a single seed shows its number. A cell whose runs have
not been evaluated (or whose metric was not computed) is an em dash, counted in the table's footnote; nothing is
filled in or estimated.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from .alignment.positions import position_label

MISSING = "—"
# (metrics.json key, column, decimals)
ABLATION_COLUMNS = [("fid", "FID", 2), ("sfid", "sFID", 2), ("is", "IS", 2), ("cond_acc", "Cond. acc. (%)", 1),
                    ("acc", "Acc. (%)", 2), ("acc_exhaustive", "Acc. exhaustive (%)", 2),
                    ("probe_acc", "Probe acc. (%)", 1)]


def _spread(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std (NaN for one value), count) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def ablation_frame(rows: list[dict]) -> pd.DataFrame:
    """rows: {experiment, label (the family's description of it), position, runs: [metrics dict or None per seed],
    [layer_base]} -> the ablation table.

    Numbers per metric: `<col>` (mean over the evaluated seeds, NaN = missing), `<col> std` and `Seeds` (evaluated
    / planned)."""
    records = []
    for r in rows:
        runs = r.get("runs") or []
        done = [m for m in runs if m]
        rec = {"Experiment": r["experiment"], "Strategy": r["label"],
               "Alignment position": position_label(r["position"], r.get("layer_base", 1)), "Seeds": f"{len(done)}/{len(runs)}"}
        for key, col, _ in ABLATION_COLUMNS:
            mean, std, _ = _spread([m.get(key) for m in done])
            rec[col], rec[f"{col} std"] = mean, std
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _cell(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return MISSING
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


def to_markdown(df: pd.DataFrame, title: str, note: str = "") -> str:
    cols = [c for _, c, _ in ABLATION_COLUMNS if c in df]
    shown = df[[c for c in df.columns if not c.endswith(" std")]].copy()
    for _, col, digits in ABLATION_COLUMNS:
        if col in df:
            shown[col] = [_cell(m, s, digits) for m, s in zip(df[col], df[f"{col} std"])]
    missing = int(df[cols].isna().sum().sum())
    lines = [f"# {title}", "", shown.to_markdown(index=False, disable_numparse=True), ""]
    if note:
        lines += [note, ""]
    if missing:
        lines += [f"{MISSING}: not run or not computed ({missing} cells).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ paper comparison
PAPER_COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("acc", "Acc. (%)")]


def paper_frame(rows: list[dict]) -> pd.DataFrame:
    """rows: {experiment, paper ('table/row' or None), runs} -> one record per mapped experiment, with our value (mean
    over seeds), the paper's and the difference (ours - paper) per metric; NaN where either side is missing."""
    from .paper import TABLES, row

    records = []
    for r in rows:
        if not r.get("paper"):
            continue
        table, _, name = r["paper"].partition("/")
        ref, done = row(r["paper"]), [m for m in r.get("runs") or [] if m]
        rec = {"Table": table, "Paper row": ref["label"], "Experiment": r["experiment"]}
        for key, col in PAPER_COLUMNS:
            mine, _, _ = _spread([m.get(key) for m in done])
            theirs = float(ref[key]) if ref.get(key) is not None else float("nan")
            rec[col], rec[f"{col} paper"], rec[f"{col} delta"] = mine, theirs, mine - theirs
        records.append(rec)
    order = {t: i for i, t in enumerate(TABLES)}
    df = pd.DataFrame.from_records(records)
    return df.sort_values("Table", key=lambda s: s.map(order), kind="stable") if len(df) else df


def paper_markdown(df: pd.DataFrame, note: str = "") -> str:
    """One section per paper table; each cell `ours / paper (ours - paper)`, a dash where a side is missing."""
    from .paper import TABLES

    def cell(rec, col):
        mine, theirs, delta = rec[col], rec[f"{col} paper"], rec[f"{col} delta"]
        if pd.isna(mine) and pd.isna(theirs):
            return MISSING
        text = f"{MISSING if pd.isna(mine) else f'{mine:.2f}'} / {MISSING if pd.isna(theirs) else f'{theirs:.2f}'}"
        return text + ("" if pd.isna(delta) else f" ({delta:+.2f})")

    lines = ["# Against the paper's numbers", "", "Each cell: ours / paper (ours - paper); "
             f"{MISSING} = not run, not computed or not reported.", ""]
    if note:
        lines += [note, ""]
    if not len(df):
        return "\n".join(lines + ["No experiment of this profile names a paper row (`paper:` in params.yaml).", ""])
    for table, part in df.groupby("Table", sort=False):
        shown = pd.DataFrame({"Paper row": part["Paper row"], "Experiment": part["Experiment"],
                              **{col: [cell(rec, col) for _, rec in part.iterrows()] for _, col in PAPER_COLUMNS}})
        lines += [f"## {TABLES[table]['title']}", "", shown.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)
