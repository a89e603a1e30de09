"""Result tables: the paper's wording, missing cells never filled, several seeds as mean ± std."""

import pandas as pd
import pytest

from flowback.tables import MISSING, ablation_frame, to_markdown


def test_table_marks_missing_cells_and_never_fills_them():
    df = ablation_frame([
        {"experiment": "baseline", "label": "TARFlow baseline", "position": None,
         "runs": [{"fid": 1.0, "sfid": 2.0, "is": 3.0, "acc": 40.0, "cond_acc": 50.0}]},
        {"experiment": "reverse_78", "label": "Reverse", "position": "7&8", "runs": [None]},
    ])
    md = to_markdown(df, "t")
    assert "| TARFlow baseline | -" in md and "1.00" in md
    assert md.count(MISSING) >= 9 and "9 cells" in md  # 7 of the unrun row; the exhaustive classifier and probe of the other


def test_several_seeds_read_mean_and_sample_std():
    runs = [{"fid": 10.0, "acc": 40.0}, {"fid": 14.0, "acc": 50.0}, None]
    df = ablation_frame([{"experiment": "b", "label": "TARFlow baseline", "position": None, "runs": runs}])
    assert df["FID"].iloc[0] == pytest.approx(12.0) and df["FID std"].iloc[0] == pytest.approx(2 ** 0.5 * 2)
    assert df["Seeds"].iloc[0] == "2/3"
    md = to_markdown(df, "t")
    assert "12.00 ± 2.83" in md and "45.00 ± 7.07" in md
    assert pd.isna(ablation_frame([{"experiment": "b", "label": "TARFlow baseline", "position": None,
                                    "runs": [{"fid": 3.0}]}])["FID std"].iloc[0])
