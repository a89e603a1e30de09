"""bench/gpu_check.py, the GPU checklist, on a CPU: every row is written as it finishes, a failing row becomes that
row's result, and --budget-s skips what would not fit in the time left."""

import json

from conftest import ROOT, command

SCRIPT = str(ROOT / "bench" / "gpu_check.py")
ROWS = ["cuda_context", "train_baseline", "train_r_repa_7_8_l6", "sample", "classifier", "ddp_nccl"]


def rows(out) -> dict[str, dict]:
    return {p.stem[3:]: json.loads(p.read_text()) for p in sorted(out.glob("[0-9][0-9]-*.json"))}


def test_a_failing_row_is_a_row_and_the_rest_run(tmp_path):
    r = command(SCRIPT, "--config", "tiny", "--out", str(tmp_path), "--inject-failure", "classifier")
    assert r.returncode == 0, r.stderr[-2000:]
    got = rows(tmp_path)
    assert list(got) == ROWS
    assert got["classifier"]["error"] == "RuntimeError: injected failure"
    for name in ("train_baseline", "train_r_repa_7_8_l6", "sample", "ddp_nccl"):
        row = got[name]
        assert "error" not in row and row["time_s"] > 0 and row["tflop"] > 0 and row["plan_alloc_gib"] > 0, row
    assert got["train_r_repa_7_8_l6"]["tflop"] > got["train_baseline"]["tflop"]  # the alignment passes add work
    assert [x["row"] for x in json.loads((tmp_path / "gpu_check.json").read_text())] == [
        json.loads((tmp_path / f"{i:02d}-{n}.json").read_text())["row"] for i, n in enumerate(ROWS)]


def test_rows_are_on_disk_as_they_finish(tmp_path):
    """The process ends inside the third row: the first two are already written, nothing else is."""
    r = command(SCRIPT, "--config", "tiny", "--out", str(tmp_path), "--inject-failure", "train R-REPA 7&8 L6:exit")
    assert r.returncode == 3
    assert list(rows(tmp_path)) == ROWS[:2] and not (tmp_path / "gpu_check.json").exists()


def test_a_time_budget_skips_the_rows_that_would_not_fit(tmp_path):
    r = command(SCRIPT, "--config", "tiny", "--out", str(tmp_path), "--budget-s", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    got = rows(tmp_path)
    ran = [n for n, row in got.items() if "skipped" not in row]
    assert list(got) == ROWS and ran[:2] == ROWS[:2] and len(ran) < len(ROWS)  # row 1 took longer than what was left
