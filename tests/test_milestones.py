"""Milestones: a run saves its model at chosen steps, and a `milestone:` experiment samples and scores that model
without training (the 400K rows read from the 1M runs)."""

import pytest
import torch

from flowback.io import load_torch
from flowback.params import ParamsError, validate

from test_training import Crash, experiment, fit


def grid(**milestone_exp):
    raw = {
        "model": {"patch_size": 4, "width": 16, "blocks": 2, "layers": 1, "head_dim": 8, "mlp_ratio": 1},
        "train": {"steps": 10, "milestones": [4]},
        "experiments": {
            "long": {"strategy": "reverse", "position": "2", "seeds": [0, 1],
                     "overrides": {"align": {"weight": 0.25}}},
            "long_at4": {"milestone": {"of": "long", "step": 4}, **milestone_exp},
        },
    }
    return validate(raw)


def test_a_milestone_experiment_reads_its_source_run_at_the_step():
    p = grid(overrides={"sample": {"per_class": 2}})
    assert p.runs() == ["long-s0", "long-s1", "long_at4-s0", "long_at4-s1"]  # the source's seeds
    e = p.run("long_at4-s1")
    assert (e.strategy, e.position, e.positions) == ("reverse", "2", [(2, 1)])
    assert e.params.align.weight == 0.25 and e.params.sample.per_class == 2  # source's overrides, then its own
    assert e.checkpoint == p.run_dir("long-s1") / "milestones" / "step_4.pt" and not e.trains
    assert p.run("long-s1").checkpoint == p.run_dir("long-s1") / "model.pt"


def test_the_last_step_is_the_trained_model_sampled_another_way():
    p = grid(overrides={"sample": {"guidance": {"method": "tarflow", "weight": 1.5}}})
    raw = p.model_dump(mode="json")
    raw["experiments"]["long_at4"]["milestone"]["step"] = 10
    e = validate(raw).run("long_at4-s0")
    assert e.checkpoint == p.run_dir("long-s0") / "model.pt" and e.params.sample.guidance.weight == 1.5


@pytest.mark.parametrize("bad, match", [
    ({"strategy": "forward"}, "strategy: a milestone experiment takes its strategy"),
    ({"seeds": [3]}, "seeds: a milestone experiment takes its seeds"),
    ({"overrides": {"train": {"lr": 1.0}}}, "overrides.train: a milestone experiment reads a trained model"),
])
def test_a_milestone_experiment_cannot_change_what_was_trained(bad, match):
    with pytest.raises(ParamsError, match=match):
        grid(**bad)


def test_the_step_must_be_one_the_source_saves():
    p = grid()
    raw = p.model_dump(mode="json")
    raw["experiments"]["long_at4"]["milestone"]["step"] = 5
    with pytest.raises(ParamsError, match=r"experiments\.long_at4\.milestone\.step: 5 is not in .*\[4\] nor its last step 10"):
        validate(raw).run("long_at4-s0")
    raw["experiments"]["long_at4"]["milestone"]["of"] = "nope"
    with pytest.raises(ParamsError, match="'nope' is not an experiment that trains"):
        validate(raw)
    with pytest.raises(ParamsError, match="milestones"):
        validate({"train": {"steps": 10, "milestones": [10]}})


def test_the_pipeline_has_no_training_for_a_milestone_and_samples_after_the_source_trains():
    from flowback.pipeline import Pipeline

    pl = Pipeline(grid(), raw={})
    names = [i.name for i in pl.instances]
    assert "train_long-s0" in names and not any(n.startswith("train_long_at4") for n in names)
    sample = pl.instance("sample", "long_at4-s0")
    assert "train_long-s0" in pl.upstream(sample)


def test_the_milestone_is_the_model_after_that_step(tmp_path, one_thread):
    exp = experiment("none", None, steps=6)  # checkpoint_every 3: the resume state at step 3 holds that model
    path = tmp_path / "milestones" / "step_3.pt"

    def crash_at_4(step):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        fit(exp, tmp_path / "state.pt", milestones={3: path}, on_step=crash_at_4)
    saved, state = load_torch(path), load_torch(tmp_path / "state.pt")
    assert saved["meta"]["steps"] == 3 and state["step"] == 3
    for k, v in state["model"].items():
        assert torch.equal(saved["weights"][k], v), k


def test_a_milestone_added_after_the_run_passed_it_is_an_error(tmp_path, one_thread):
    from flowback.training import TrainingError

    exp = experiment("none", None, steps=6)
    with pytest.raises(Crash):
        fit(exp, tmp_path / "state.pt", on_step=lambda s: (_ for _ in ()).throw(Crash) if s == 4 else None)
    with pytest.raises(TrainingError, match="milestone step 2 was added after the run passed it"):
        fit(exp, tmp_path / "state.pt", milestones={2: tmp_path / "m2.pt"})
