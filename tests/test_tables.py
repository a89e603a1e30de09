"""The result tables: seeds are averaged and spread, rows are compared with the baseline by Welch's test (checked
against its closed form), missing cells are marked and never filled, and the paper's numbers sit beside ours
without arithmetic across data sets."""

import math

import pandas as pd
import pytest

from flowback.tables import MISSING, Row, comparisons, frame, paper_frame, summaries, to_markdown, welch


def row(name, label, fids, baseline=False, **kw):
    return Row(name, label, kw.pop("position", None), [{"fid": f, **kw} if f is not None else None for f in fids],
               baseline=baseline)


def test_welch_matches_its_closed_form():
    a, b = [10.0, 12.0, 11.0, 13.0], [15.0, 18.0, 16.0, 17.0]
    c = welch(a, b)
    va, vb = 1.6667 / 4, 1.6667 / 4  # both samples have variance 5/3
    se = math.sqrt(va + vb)
    t = (11.5 - 16.5) / se
    assert c.diff == pytest.approx(-5.0)
    assert c.p == pytest.approx(0.001547, abs=1e-6)  # R: t.test(c(10,12,11,13), c(15,18,16,17))$p.value
    assert t == pytest.approx(-5.477, abs=1e-3)
    half = 2.4469 * se  # t_{0.975, 6}
    assert (c.low, c.high) == pytest.approx((-5 - half, -5 + half), abs=1e-3)
    assert c.significant and welch([1.0], b) is None and welch(a, [2.0]) is None  # one seed: nothing to test


def test_identical_groups_are_not_different():
    c = welch([3.0, 3.0], [3.0, 3.0])
    assert c.diff == 0 and c.p == 1.0 and not c.significant


def test_table_marks_missing_cells_and_never_fills_them():
    df = frame([row("baseline", "TARFlow baseline", [1.0], baseline=True, sfid=2.0, acc=40.0),
                row("reverse_78", "Reverse", [None], position="7&8")])
    md = to_markdown(df, "t")
    assert "| baseline " in md and "1.00" in md
    assert df.loc[df.Experiment == "reverse_78", "FID"].isna().all()
    assert MISSING in md and "cells)" in md


def test_several_seeds_read_mean_and_sample_std_and_the_comparison():
    base = row("b", "TARFlow baseline", [10.0, 14.0, None], baseline=True)
    other = row("r", "Reverse", [8.0, 9.0, 7.0], position="7&8")
    df = frame([base, other])
    assert df["FID"].iloc[0] == pytest.approx(12.0) and df["FID std"].iloc[0] == pytest.approx(2 ** 0.5 * 2)
    assert list(df["Seeds"]) == ["2/3", "3/3"]
    assert df["FID diff"].iloc[1] == pytest.approx(8.0 - 12.0)
    assert df["FID p"].iloc[1] == pytest.approx(welch([8.0, 9.0, 7.0], [10.0, 14.0]).p)
    md = to_markdown(df, "t", compared=comparisons([base, other]))
    assert "12.00 ± 2.83" in md and "r vs b (3 vs 2 seeds)" in md
    assert pd.isna(df["FID diff"].iloc[0])  # the baseline is not compared with itself


def test_a_sentence_says_no_difference_unless_p_is_below_005():
    base = row("b", "TARFlow baseline", [10.0, 14.0, 12.0, 13.0], baseline=True)
    close = row("c", "Reverse", [11.0, 15.0, 12.5, 12.0])
    far = row("f", "Reverse", [5.0, 6.0, 5.5, 6.5])
    text = comparisons([base, close, far])
    assert "FID" in text[0] and "no difference at p < 0.05" in text[0]
    assert "lower" in text[1] and "no difference" not in text[1]


def test_summaries_are_flat_records_per_experiment():
    df = frame([row("b", "TARFlow baseline", [10.0, 14.0], baseline=True), row("r", "Reverse", [8.0, 9.0])])
    s = summaries(df)
    assert s["b"]["seeds"] == 2 and s["b"]["fid"] == 12.0 and s["b"]["dfid"] is None
    assert s["r"]["dfid"] == pytest.approx(-3.5) and 0 < s["r"]["p_fid"] < 1
    assert all(not isinstance(v, dict) for rec in s.values() for v in rec.values())  # one level: dvc metrics show


def test_the_paper_sits_beside_ours_as_ranks_never_as_differences():
    rows = [Row("baseline", "TARFlow baseline", None, [{"fid": 17.0}], paper=["ablation/baseline"]),
            Row("reverse_78", "Reverse", "7&8", [{"fid": 12.0}], paper=["ablation/reverse_78"])]
    df = paper_frame(rows)
    assert list(df["FID"]) == [17.0, 12.0] and list(df["FID paper"]) == [12.91, 11.93]
    assert list(df["FID rank"]) == [2, 1] and list(df["FID paper rank"]) == [2, 1]
    assert not [c for c in df.columns if "delta" in c or "diff" in c]
