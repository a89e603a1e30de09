"""The pipeline's stages: each module in this package is one stage, declared once as `STAGE = Stage(...)` - its name,
whether it runs once per run of the grid, whether the launcher (torchrun) starts it, the params keys it reads, the
files it needs and writes, and its work. Adding a stage is one module here.

`python -m flowback stage NAME [RUN]` runs one (flowback/runner.py); flowback/pipeline.py turns the declarations into
dvc.yaml and the Snakefile's rules. Stage modules import heavy libraries inside `run`, so reading the declarations
stays cheap.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..families.base import RUNTIME  # noqa: F401  (the keys flowback.runtime.configure reads, for stage modules)


@dataclass
class Outputs:
    outs: list[str] = field(default_factory=list)  # large files DVC caches (models, samples, shards)
    metrics: list[str] = field(default_factory=list)  # the results a user diffs (kept in git): `dvc metrics show/diff`
    plots: list[str] = field(default_factory=list)  # curves, one field a file named <field>.tsv: `dvc plots show`
    plot_axes: dict[str, tuple[str, str]] = field(default_factory=dict)  # a plot that is a table: file -> (x, y)
    files: list[str] = field(default_factory=list)  # other small outputs kept in git (per-run records, tables, figures)
    persist: list[str] = field(default_factory=list)  # outputs DVC must not delete before the stage runs
    records: list[str] = field(default_factory=list)  # records of the machine (timings): not cached, not in git
    report: dict[str, str] = field(default_factory=dict)  # files (of the above) -> caption in report/: snakemake --report

    def all(self) -> list[str]:
        return self.outs + self.metrics + self.plots + self.files + self.persist + self.records


def _always(_: Any) -> bool:
    return True


def _nothing(_: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage. `cfg` is the params (per_run False) or one run's merged Experiment (per_run True)."""

    name: str
    doc: str  # one line: what it makes
    reads: Callable[[Any], list[str]]  # params keys it reads (dotted; a key covers everything below it)
    outputs: Callable[[Any], Outputs]
    run: Callable[[Any, bool], str]  # (cfg, progress) -> a one-line summary
    inputs: Callable[[Any], list[str]] = _nothing  # files it needs (outputs of other stages, or external files)
    per_run: bool = False  # one instance per run of the grid (`<experiment>-s<seed>`)
    launched: bool = False  # started with runtime.launcher (torchrun for DDP) instead of plain python
    switch: str = ""  # the params key that puts the stage in this profile's pipeline when true (or non-empty); empty:
    # the stage is always there
    applies: Callable[[Any], bool] = _always  # (run's Experiment) -> whether that run has the stage
    resumes: str = ""  # what a rerun after Ctrl-C or a crash picks up, for the runner's message (empty: it starts over)
    family_methods: tuple[str, ...] = ()  # the model-family methods it calls (its run's family; a global stage: the
    # grid's families): the code it depends on (flowback/pipeline.py)

    def enabled(self, params: Any) -> bool:
        """Whether this profile's pipeline has the stage at all (its `switch`; the runner refuses it by that key)."""
        return not self.switch or bool(functools.reduce(getattr, self.switch.split("."), params))

    @property
    def calls_families(self) -> bool:
        return bool(self.family_methods)


@functools.cache
def stages() -> dict[str, Stage]:
    """Every stage, by name (modules of this package, alphabetical; the pipeline orders instances by their files)."""
    out = {}
    for m in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        stage = importlib.import_module(f"{__name__}.{m.name}").STAGE
        if stage.name != m.name:
            raise ValueError(f"flowback/stages/{m.name}.py declares a stage named {stage.name!r}")
        out[stage.name] = stage
    return out


def stage(name: str) -> Stage:
    found = stages()
    if name not in found:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(found)}")
    return found[name]


def module(name: str) -> str:
    """The module that declares stage `name` (its code is in every instance's dependencies)."""
    return f"{__name__}.{name}"
