"""The experiment grid: runs (`<experiment>-s<seed>`) and the one merged, validated config each run's stages get.

A run's config is the top-level params with its experiment's overrides deep-merged in and its training seed set; a
milestone experiment takes its trained source's settings, then its own sampling / metrics overrides.
"""

from __future__ import annotations

import copy
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..alignment.positions import PositionError, parse_position
from ..errors import ParamsError
from .loading import validate
from .schema import MilestoneRef, Params

def run_id(name: str, seed: int) -> str:
    return f"{name}-s{seed}"


def split_run_id(run: str) -> tuple[str, int]:
    name, sep, seed = run.rpartition("-s")
    if not sep or not seed.isdigit():
        raise ParamsError(f"run {run!r}: expected <experiment>-s<seed>, e.g. baseline-s0")
    return name, int(seed)


class Experiment(BaseModel):
    """One run of the grid: the top-level params with the experiment's overrides and seed applied (`params`, whose
    registry holds only this experiment), its alignment positions and its run directory. The one config object an
    experiment stage receives."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    seed: int
    params: Params
    family: str
    strategy: str
    position: str | None
    positions: list[tuple[int, int]]
    paper: str | list[str] | None = None
    milestone: MilestoneRef | None = None

    @property
    def run(self) -> str:
        return run_id(self.name, self.seed)

    @property
    def run_dir(self) -> Path:
        return self.params.run_dir(self.run)

    @property
    def source_keys(self) -> list[str]:
        """The params that say which model this run reads: its experiments: entry, and for a milestone also the
        trained experiment's entry and train.steps (whether the step is its model.pt or a milestone file)."""
        if self.milestone is None:
            return [f"experiments.{self.name}"]
        return [f"experiments.{self.name}", f"experiments.{self.milestone.of}", "train.steps"]

    @property
    def trains(self) -> bool:
        """False for a milestone experiment: it reads another run's model."""
        return self.milestone is None

    @property
    def checkpoint(self) -> Path:
        """The model this run samples and scores: its own model.pt, or the milestone of the run it reads."""
        if self.milestone is None:
            return self.run_dir / "model.pt"
        source = self.params.run_dir(run_id(self.milestone.of, self.seed))
        if self.milestone.step == self.params.train.steps:  # the last step: the trained model itself
            return source / "model.pt"
        return milestone_path(source, self.milestone.step)

    @property
    def model_meta(self) -> dict:
        """What the meta of the model this run reads must record (flowback.checkpoints.check_meta): the experiment
        that trained it (its own, or a milestone's source), the seed and the alignment."""
        return {"experiment": self.milestone.of if self.milestone else self.name, "seed": self.seed,
                "strategy": self.strategy, "position": self.position}


def milestone_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "milestones" / f"step_{step}.pt"


def _deep_merge(base: dict, over: dict, path: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in out:
            raise ParamsError(f"{path}.{k}: unknown key (overrides may only change keys that exist)")
        if isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _deep_merge(out[k], v, f"{path}.{k}")
        else:
            out[k] = v
    return out


def experiment(params: Params, name: str, seed: int) -> Experiment:
    """The merged, validated config of experiment `name` at training seed `seed` (what Params.run returns)."""
    from ..families import family

    exp = spec = params.experiments[name]
    base = params.model_dump(mode="python")
    where = f"experiments.{name}.overrides"
    if "experiments" in exp.overrides:
        raise ParamsError(f"{where}.experiments: an experiment cannot override the registry")
    merged = base
    if exp.milestone is not None:  # the trained experiment's settings, then this one's sampling/metrics overrides
        spec = params.experiments[exp.milestone.of]
        if not family(spec.family).saves_milestones:
            raise ParamsError(f"experiments.{name}.milestone: {exp.milestone.of} is of family {spec.family!r}, "
                              f"whose training saves no milestones")
        source = experiment(params, exp.milestone.of, seed)
        st = source.params.train
        if exp.milestone.step not in st.milestones and exp.milestone.step != st.steps:
            raise ParamsError(f"experiments.{name}.milestone.step: {exp.milestone.step} is not in experiments."
                              f"{exp.milestone.of}'s train.milestones {st.milestones} nor its last step {st.steps}")
        merged = _deep_merge(merged, spec.overrides, f"experiments.{exp.milestone.of}.overrides")
    merged = _deep_merge(merged, exp.overrides, where) if exp.overrides else merged
    merged["train"]["seed"] = seed
    merged["experiments"] = {k: base["experiments"][k] for k in (name, exp.milestone and exp.milestone.of) if k}
    merged_params = validate(merged, where=where if exp.overrides else None)
    positions: list[tuple[int, int]] = []
    if spec.position is not None:
        try:
            a = merged_params.align
            positions = parse_position(spec.position, merged_params.model.layers_per_block(), a.default_layer,
                                       a.layer_base)
        except PositionError as e:
            raise ParamsError(f"experiments.{name}.position: {e}") from None
    run = Experiment(name=name, seed=seed, params=merged_params, family=spec.family, strategy=spec.strategy,
                     position=spec.position, positions=positions, paper=exp.paper, milestone=exp.milestone)
    family(spec.family).check_run(run)
    return run


