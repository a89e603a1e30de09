"""Params are validated up front: every error names its key path; impossible rows fail before any work."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowback.params import ParamsError, load_params, parse_position, validate, validate_all

ROOT = Path(__file__).resolve().parents[1]


def default_raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def check(raw):
    return validate_all(validate(raw))


def test_default_params_are_valid_and_define_the_paper_grid():
    p = load_params(ROOT / "params.yaml")
    rows = {(e.strategy, e.position) for e in p.experiments.values()}
    assert {("none", None), ("forward", "all"), ("detach", "all"), ("reverse", "all"), ("forward", "1&2"),
            ("detach", "7&8"), ("reverse", "7&8")} <= rows


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["model"].update(widht=64), "model.widht: unknown key"),
    (lambda r: r.update(extra_section={}), "extra_section: unknown key"),
    (lambda r: r["train"].update(steps="many"), "train.steps"),
    (lambda r: r["model"].update(blocks=0), "model.blocks"),
    (lambda r: r["sample"]["guidance"].update(method="cfg++"), "sample.guidance.method"),
    (lambda r: r["experiments"]["forward_12"].update(strategy="sideways"), "experiments.forward_12.strategy"),
])
def test_bad_values_name_their_key(mutate, key):
    raw = default_raw()
    mutate(raw)
    with pytest.raises(ParamsError) as err:
        check(raw)
    assert key in str(err.value)


def test_alignment_block_beyond_the_model_is_rejected_with_its_row():
    raw = default_raw()
    raw["experiments"]["reverse_78"]["position"] = "9&10"
    with pytest.raises(ParamsError) as err:
        check(raw)
    assert "experiments.reverse_78.position" in str(err.value) and "9" in str(err.value)


def test_layer_beyond_the_block_is_rejected():
    with pytest.raises(ValueError, match="layer 9"):
        parse_position("7&8 layer 9", [8] * 8)


def test_positions_follow_the_paper_numbering():
    assert parse_position("all", [2, 3]) == [(1, 2), (2, 3)]
    assert parse_position("1&2", [8] * 8) == [(1, 8), (2, 8)]
    assert parse_position("7&8 layer 6", [8] * 8) == [(7, 6), (8, 6)]


def test_position_without_strategy_and_strategy_without_position_are_rejected():
    raw = default_raw()
    raw["experiments"]["baseline"]["position"] = "all"
    with pytest.raises(ParamsError, match="experiments.baseline"):
        check(raw)
    raw = default_raw()
    del raw["experiments"]["reverse_78"]["position"]
    with pytest.raises(ParamsError, match="experiments.reverse_78"):
        check(raw)


def test_overrides_may_only_change_existing_keys():
    raw = default_raw()
    raw["experiments"]["reverse_78"]["overrides"] = {"train": {"stpes": 10}}
    with pytest.raises(ParamsError, match=r"experiments.reverse_78.overrides.train.stpes: unknown key"):
        check(raw)
    raw["experiments"]["reverse_78"]["overrides"] = {"train": {"steps": 10}}
    p = check(raw)
    assert p.experiment("reverse_78").params.train.steps == 10 and p.train.steps != 10


def test_latent_mode_needs_a_vae_directory():
    raw = default_raw()
    raw["model"]["latent"] = {}
    with pytest.raises(ParamsError, match="model.latent.vae_dir"):
        check(raw)


def test_stage_stops_before_work_with_a_one_line_error(tmp_path):
    raw = default_raw()
    raw["train"]["lr"] = "fast"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(bad)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "train.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()


def test_flowback_check_lists_the_grid():
    r = subprocess.run([sys.executable, "-m", "flowback", "check", "--params", str(ROOT / "params.yaml")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "reverse_78" in r.stdout and "block 8 layer" in r.stdout
