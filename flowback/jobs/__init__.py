"""The pipeline's stages as library code: one module per stage, each declaring what it reads and writes.

A stage module has
- `PER_RUN`: one instance per run of the grid (`<experiment>-s<seed>`), or one for the whole params;
- `LAUNCHED`: started with `runtime.launcher` (torchrun for DDP) instead of plain `python`;
- `enabled(params)` (optional): whether the stage is part of this profile's pipeline at all;
- `applies(run config)` (optional, PER_RUN stages): whether a run has this stage (a milestone run does not train,
  an adversarial flow has no probe);
- `reads(cfg)`: the params keys it reads (dotted; a key covers everything below it). The stage receives a config in
  which every other value raises when used (flowback.params.restrict), so the list is exact by construction, and
  dvc.yaml / the Snakefile declare exactly these keys;
- `inputs(cfg)` / `outputs(cfg)`: the files it needs and the files it writes;
- `run(cfg, progress) -> str`: the work, returning a one-line summary.

`stages/<name>.py` is only the command line around `run`; flowback.pipeline builds dvc.yaml and the Snakefile's rules
from these declarations. Modules import heavy libraries inside `run`, so reading the declarations stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

# pipeline order: a stage only needs outputs of stages before it
NAMES = ("prepare", "encoder", "metricnet", "reference", "decoder", "train", "sample", "evaluate", "probe",
         "table")
RUNTIME = ["runtime.device", "runtime.threads", "runtime.tf32"]  # what flowback.runtime.configure reads
FLOW_KEYS = ["model", "data.dataset", "data.image_size", "data.classes"]  # what builders.flow_config reads


@dataclass
class Outputs:
    outs: list[str] = field(default_factory=list)  # large files DVC caches (models, samples, shards)
    metrics: list[str] = field(default_factory=list)  # science only, kept in git: `dvc metrics show/diff`
    plots: list[str] = field(default_factory=list)  # CSV curves: `dvc plots show`
    files: list[str] = field(default_factory=list)  # other small outputs kept in git (tables, figures, timings)
    persist: list[str] = field(default_factory=list)  # outputs DVC must not delete before the stage runs

    def all(self) -> list[str]:
        return self.outs + self.metrics + self.plots + self.files + self.persist


def job(name: str) -> ModuleType:
    if name not in NAMES:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(NAMES)}")
    return importlib.import_module(f"flowback.jobs.{name}")
