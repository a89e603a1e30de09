"""Params are validated up front: every error names its key path; impossible rows fail before any work."""

import pytest
import yaml
from conftest import ROOT, command, default_raw

from flowback.params import (ParamsError, UndeclaredParamError, load_params, restrict, validate,
                             validate_all)


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
    assert p.run("reverse_78-s0").params.train.steps == 10 and p.train.steps != 10


def test_latent_mode_needs_a_vae_directory():
    raw = default_raw()
    raw["model"]["latent"] = {}
    with pytest.raises(ParamsError, match="model.latent.vae_dir"):
        check(raw)


@pytest.mark.slow
def test_stage_stops_before_work_with_a_one_line_error(tmp_path):
    raw = default_raw()
    raw["train"]["lr"] = "fast"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    r = command("-m", "flowback", "stage", "prepare", "--params", str(bad))
    assert r.returncode == 2
    assert "train.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_flowback_check_lists_the_grid():
    r = command("-m", "flowback", "check", "--params", str(ROOT / "params.yaml"))
    assert r.returncode == 0, r.stderr
    assert "reverse_78-s0" in r.stdout and "block 8 layer" in r.stdout


@pytest.mark.parametrize("text, key", [
    ("", "empty"),
    ("# only a comment\n\n", "empty"),
    ("train:\n  steps: 10\ntrain:\n  lr: 0.1\n", "duplicate key 'train'"),
    ("train:\n  steps: 10\n  steps: 20\n", "duplicate key 'steps'"),
    ("experiments:\n  a: {strategy: none}\n  a: {strategy: reverse, position: all}\n", "duplicate key 'a'"),
    ("train:\n  steps: true\n", "train.steps: expected a number, got the boolean true"),
    ("train:\n  betas: [true, 0.9]\n", "train.betas"),
    ("seed: -1\n", "seed"),
    ("train:\n  seed: 4294967296\n", "train.seed"),
    ("experiments:\n  a: {strategy: none, seeds: [0, 0]}\n", "repeat a seed"),
])
@pytest.mark.slow
def test_params_meaning_something_else_are_one_line_errors(tmp_path, text, key):
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert key in str(err.value) and "\n" not in str(err.value), str(err.value)
    r = command("-m", "flowback", "check", "--params", str(bad))
    assert r.returncode == 2 and key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_missing_cuda_device_is_a_params_error(monkeypatch):
    from flowback.runtime import device

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ParamsError, match="runtime.device: 'cuda', but this machine has no CUDA device"):
        device("cuda")
    assert device("auto").type == "cpu"


def test_runs_expand_seeds_and_merge_them_into_train_seed():
    raw = default_raw()
    raw["experiments"] = {"base": {"strategy": "none", "seeds": [3, 4]}, "rev": {"strategy": "reverse",
                                                                            "position": "7&8"}}
    p = check(raw)
    assert p.runs() == ["base-s3", "base-s4", f"rev-s{p.train.seed}"]
    run = p.run("base-s4")
    assert run.params.train.seed == 4 and run.run_dir.name == "base-s4"
    assert list(run.params.experiments) == ["base"]  # a run's config holds only its own registry entry
    with pytest.raises(ParamsError, match="no run named 'base-s9'"):
        p.run("base-s9")


def test_a_stage_can_read_only_what_it_declares():
    p = load_params(ROOT / "params.yaml")
    r = restrict(p, ["train", "data.root", "data.dataset"], "train")
    assert r.train.steps == p.train.steps and r.data.dir == p.data.dir
    for read in (lambda: r.model.width + 1, lambda: f"{r.seed}", lambda: r.data.num_classes,
                 lambda: r.align.weight * 2):
        with pytest.raises(UndeclaredParamError, match="stage 'train' read params key"):
            read()
    with pytest.raises(KeyError, match="does not exist"):
        restrict(p, ["train.nope"], "train")


@pytest.mark.parametrize("entry, key", [
    ({"family": "af", "strategy": "reverse", "position": "7&8"}, "experiments.a: strategy 'reverse'"),
    ({"family": "af", "overrides": {"model": {"width": 32}}}, "overrides.model: a TARFlow setting"),
])
@pytest.mark.slow
def test_tarflow_settings_on_an_adversarial_flow_are_one_line_errors(tmp_path, entry, key):
    raw = default_raw()
    raw["experiments"] = {"a": entry}
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    r = command("-m", "flowback", "check", "--params", str(bad))
    assert r.returncode == 2 and key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
