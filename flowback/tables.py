"""Paper-style result tables from the runs' JSON files: pandas in, Markdown, CSV and per-experiment summaries out.

One row per experiment. An experiment trained at several seeds shows the mean and the standard deviation over its
seeds (`mean ± std`, sample std, n-1) and how many seeds ran. Each experiment of the baseline's family with >= 2
seeds is compared with the baseline (>= 2 seeds too): the difference of the means with its 95 % interval and the
p-value of Welch's t-test (two-sided, unequal variances; no correction for the several comparisons a table makes),
marked `*` where p < 0.05. A row with one seed is marked as such and compared with nothing. A cell whose runs have not
been evaluated (or whose metric was not computed) is an em dash, counted in the footnote; nothing is filled in or
estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .alignment.positions import position_label

MISSING = "—"
# (key in a run's record, column, decimals); the first table is generation, the second representation
GENERATION = [("fid", "FID", 2), ("sfid", "sFID", 2), ("is", "IS", 2), ("recall", "Recall", 3),
              ("cond_acc", "Cond. acc. (%)", 1)]
REPRESENTATION = [("acc", "Acc. (%)", 1), ("acc_exhaustive", "Acc. exhaustive (%)", 1), ("probe_acc", "Probe acc. (%)", 1)]
GUIDANCE = [("scale", "CFG", 2), ("fid_unguided", "FID unguided", 2)]
COMPARED = [("fid", "FID", 2), ("sfid", "sFID", 2), ("acc", "Acc. (%)", 1)]  # differences to the baseline
ALPHA = 0.05


# ------------------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Comparison:
    """mean(row) - mean(baseline) over seeds, its 95 % Welch interval and Welch's two-sided p."""

    diff: float
    low: float
    high: float
    p: float
    n: int
    n_base: int

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def cell(self, digits: int) -> str:
        star = "*" if self.significant else ""
        return (f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"p={self.p:.3f}{star}")


def welch(values: list[float], base: list[float]) -> Comparison | None:
    """None unless both sides have >= 2 values (one seed has no spread to test against)."""
    from scipy import stats

    a, b = np.asarray(values, float), np.asarray(base, float)
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = float(a.mean() - b.mean()), math.sqrt(va + vb)
    if se == 0:
        return Comparison(diff, diff, diff, 1.0 if diff == 0 else 0.0, len(a), len(b))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Comparison(diff, diff - half, diff + half, p, len(a), len(b))


def _finite(values: list) -> list[float]:
    return [float(x) for x in values if x is not None and np.isfinite(x)]


def spread(values: list) -> tuple[float, float, int]:
    """(mean, sample std (NaN for one value), count) of the finite values."""
    v = _finite(values)
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), len(v)


# ------------------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One experiment: its label and alignment position, and one record per planned seed (None: not evaluated)."""

    experiment: str
    label: str
    position: str | None
    runs: list[dict | None]
    family: str = "tarflow"
    baseline: bool = False  # the row the others of its family are compared with
    layer_base: int = 1
    paper: list[str] = field(default_factory=list)  # the paper's rows it reproduces

    def values(self, key: str) -> list[float]:
        return _finite([r.get(key) for r in self.runs if r])

    @property
    def done(self) -> int:
        return sum(1 for r in self.runs if r)


def frame(rows: list[Row]) -> pd.DataFrame:
    """Every number of the table, machine-readable: per metric `<col>`, `<col> std`, and for the compared metrics
    `<col> diff`, `<col> low`, `<col> high`, `<col> p` against the baseline of the row's family."""
    base = {r.family: r for r in rows if r.baseline}
    records = []
    for r in rows:
        rec = {"Experiment": r.experiment, "Strategy": r.label,
               "Alignment position": position_label(r.position, r.layer_base), "Seeds": f"{r.done}/{len(r.runs)}"}
        for key, col, _ in GUIDANCE + GENERATION + REPRESENTATION:
            rec[col], rec[f"{col} std"], _ = spread(r.values(key))
        b = base.get(r.family)
        for key, col, _ in COMPARED:
            c = welch(r.values(key), b.values(key)) if b is not None and b is not r else None
            for part in ("diff", "low", "high", "p"):
                rec[f"{col} {part}"] = getattr(c, part) if c else float("nan")
        records.append(rec)
    return pd.DataFrame.from_records(records)


def comparisons(rows: list[Row]) -> list[str]:
    """One sentence per row compared with its baseline: the generated text the README's claims must come from."""
    base = {r.family: r for r in rows if r.baseline}
    lines = []
    for r in rows:
        b = base.get(r.family)
        if b is None or b is r:
            continue
        parts = []
        for key, col, digits in COMPARED:
            c = welch(r.values(key), b.values(key))
            if c is None:
                continue
            verdict = ("lower" if c.diff < 0 else "higher") if c.significant else "no difference at p < 0.05"
            parts.append(f"{col} {c.diff:+.{digits}f} [{c.low:+.{digits}f}, {c.high:+.{digits}f}], p = {c.p:.3f}: "
                         f"{verdict}")
        if parts:
            n = len(r.values("fid"))
            lines.append(f"- {r.experiment} vs {b.experiment} ({n} vs {len(b.values('fid'))} seeds): "
                         + "; ".join(parts) + ".")
    return lines


def _cell(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return MISSING
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


def _diff_cell(rec, col: str, digits: int) -> str:
    if pd.isna(rec[f"{col} diff"]):
        return MISSING
    c = Comparison(rec[f"{col} diff"], rec[f"{col} low"], rec[f"{col} high"], rec[f"{col} p"], 0, 0)
    return c.cell(digits)


def markdown_tables(df: pd.DataFrame, calibration: list[dict] | None = None) -> tuple[str, int]:
    """(the generation and representation tables, the number of missing cells)."""
    ident = ["Experiment", "Strategy", "Alignment position", "Seeds"]
    gen = df[ident].copy()
    for key, col, digits in GUIDANCE + GENERATION:
        gen[col] = [_cell(m, s, digits) for m, s in zip(df[col], df[f"{col} std"])]
        if key in {k for k, _, _ in COMPARED}:
            gen[f"Δ{col} vs baseline [95% CI]"] = [_diff_cell(rec, col, digits) for _, rec in df.iterrows()]
    if calibration:
        gen = pd.concat([pd.DataFrame([{c: cal.get(c, MISSING) for c in gen.columns} for cal in calibration]), gen],
                        ignore_index=True)
    rep = df[["Experiment", "Seeds"]].copy()
    for key, col, digits in REPRESENTATION:
        rep[col] = [_cell(m, s, digits) for m, s in zip(df[col], df[f"{col} std"])]
        if key in {k for k, _, _ in COMPARED}:
            rep[f"Δ{col} vs baseline [95% CI]"] = [_diff_cell(rec, col, digits) for _, rec in df.iterrows()]
    missing = int(sum((t == MISSING).sum().sum() for t in (gen, rep)))
    text = "\n".join(["## Generation", "", gen.to_markdown(index=False, disable_numparse=True), "",
                      "## Representation", "", rep.to_markdown(index=False, disable_numparse=True), ""])
    return text, missing


def to_markdown(df: pd.DataFrame, title: str, note: str = "", compared: list[str] | None = None,
                calibration: list[dict] | None = None) -> str:
    tables, missing = markdown_tables(df, calibration)
    lines = [f"# {title}", "", tables]
    if compared:
        lines += ["## Compared with the baseline", "",
                  "Welch's t-test over training seeds, two-sided, 95 % intervals, no correction for multiple "
                  "comparisons; rows with one seed are not compared.", "", *compared, ""]
    if note:
        lines += [note, ""]
    if missing:
        lines += [f"{MISSING}: not run, not computed, not defined for the model, or not compared ({missing} cells).", ""]
    return "\n".join(lines)


def summaries(df: pd.DataFrame) -> dict[str, dict]:
    """{experiment: a flat record}: the DVC metric a user diffs first (one short file per experiment)."""
    keys = {"CFG": "cfg", "FID": "fid", "FID std": "fid_std", "FID unguided": "fid_unguided", "sFID": "sfid",
            "IS": "is", "Recall": "recall", "Cond. acc. (%)": "cond_acc", "Acc. (%)": "acc",
            "Probe acc. (%)": "probe_acc", "FID diff": "dfid", "FID p": "p_fid"}
    out = {}
    for _, rec in df.iterrows():
        s = {"seeds": int(rec["Seeds"].split("/")[0])}
        s.update({short: (None if pd.isna(rec[col]) else round(float(rec[col]), 4)) for col, short in keys.items()})
        out[rec["Experiment"]] = s
    return out


# ------------------------------------------------------------------------------------------------ paper comparison
PAPER_COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("acc", "Acc. (%)")]


def paper_frame(rows: list[Row]) -> pd.DataFrame:
    """One record per experiment that names a paper row: our value (mean over seeds) and the paper's, side by side,
    and each side's rank by FID within its table (lower FID = rank 1): values of different data sets and metric
    networks are never subtracted."""
    from .paper import TABLES, row

    records = []
    for r in rows:
        for key_ in r.paper:
            table = key_.partition("/")[0]
            ref = row(key_)
            rec = {"Table": table, "Paper row": ref["label"], "Experiment": r.experiment}
            for key, col in PAPER_COLUMNS:
                rec[col], _, _ = spread(r.values(key))
                rec[f"{col} paper"] = float(ref[key]) if ref.get(key) is not None else float("nan")
            records.append(rec)
    df = pd.DataFrame.from_records(records)
    if not len(df):
        return df
    for col in ("FID", "FID paper"):
        df[f"{col} rank"] = df.groupby("Table")[col].rank(method="min")
    order = {t: i for i, t in enumerate(TABLES)}
    return df.sort_values("Table", key=lambda s: s.map(order), kind="stable")


def paper_markdown(df: pd.DataFrame, note: str = "") -> str:
    """One section per paper table; each cell `ours | paper`, and FID ranks within the table on each side."""
    from .paper import TABLES

    def cell(rec, col):
        mine, theirs = rec[col], rec[f"{col} paper"]
        return f"{MISSING if pd.isna(mine) else f'{mine:.2f}'} | {MISSING if pd.isna(theirs) else f'{theirs:.2f}'}"

    lines = ["# Beside the paper's numbers", "",
             f"Each cell: ours | paper ({MISSING} = not run, not computed or not reported). Our numbers and the paper's "
             "come from different data, models and metric networks unless the profile is the paper's: compare the "
             "order of the rows (FID rank within each table), not the values.", ""]
    if note:
        lines += [note, ""]
    if not len(df):
        return "\n".join(lines + ["No experiment of this profile names a paper row (`paper:` in params.yaml).", ""])
    for table, part in df.groupby("Table", sort=False):
        shown = pd.DataFrame({"Paper row": part["Paper row"], "Experiment": part["Experiment"],
                              **{col: [cell(rec, col) for _, rec in part.iterrows()] for _, col in PAPER_COLUMNS},
                              "FID rank (ours / paper)": [
                                  f"{MISSING if pd.isna(a) else int(a)} / {MISSING if pd.isna(b) else int(b)}"
                                  for a, b in zip(part["FID rank"], part["FID paper rank"])]})
        lines += [f"## {TABLES[table]['title']}", "", shown.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)
