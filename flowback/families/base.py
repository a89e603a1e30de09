"""What a model family gives the pipeline's stages: the params keys each stage reads for it, how it trains, samples
and (if it has a likelihood) scores, its table label and its memory plan.

Stages call these and never ask which family they hold. Methods import their heavy code inside, so resolving the grid
stays cheap. A family that has no likelihood has no training-free classifier and no linear probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch

    from ..params import Experiment, Params
    from ..params.schema import ExperimentParams

RUNTIME = ["runtime.device", "runtime.threads", "runtime.tf32"]  # what flowback.runtime.configure reads


@dataclass
class Trained:
    """What a family's training returns to the train stage (rank 0), which writes the files around the model."""

    summary: dict[str, Any]  # science: train.json
    log: list[dict[str, float]]  # train_log.csv rows
    timing: dict[str, Any]  # seconds, images/s, ...: a record of the machine, not a result
    message: str  # the stage's one-line summary


@dataclass
class Sampled:
    """What a family's sampler returns to the sample stage (rank 0): uint8 NCHW images and their labels."""

    images: "np.ndarray"
    labels: "np.ndarray"
    record: dict[str, Any]  # what was drawn (guidance, solver, ...): sample.json
    timing: dict[str, Any] = field(default_factory=dict)


class Family:
    """The interface; a family module defines a subclass and `FAMILY = TheSubclass()`."""

    name: str = ""
    has_likelihood: bool = True  # training-free classifier and linear probes
    has_guidance: bool = False  # classifier-free guidance: a weight the sweep can choose
    saves_milestones: bool = False  # train.milestones: models saved along the way, read by milestone experiments
    log_fields: tuple[str, ...] = ()  # log columns worth a curve (besides step): a DVCLive file each

    # -------------------------------------------------------------------------------------- params
    def check_experiment(self, spec: "ExperimentParams") -> None:
        """Raise ValueError for an experiments: entry this family cannot run (message names the key)."""

    def check_run(self, e: "Experiment") -> None:
        """Raise a ParamsError for a merged run this family cannot run."""

    def label(self, p: "Params", spec: "ExperimentParams") -> str:
        """The table's description of an experiment of this family."""
        raise NotImplementedError

    def describe(self, e: "Experiment") -> str:
        """One line for `flowback check`: what the run trains."""
        raise NotImplementedError

    def model_reads(self, e: "Experiment") -> list[str]:
        """Params that define the model's architecture (what loading a checkpoint checks against)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- train
    def train_reads(self, e: "Experiment") -> list[str]:
        raise NotImplementedError

    def train_inputs(self, e: "Experiment") -> list[str]:
        return []

    def train_outs(self, e: "Experiment") -> list[str]:
        """Model files training writes besides model.pt (milestones)."""
        return []

    def train(self, e: "Experiment", device: "torch.device", rank: int, world: int, fingerprint: str,
              progress: bool, on_log: Callable[[list[dict]], None]) -> Trained | None:
        """Train the run and save its model.pt (resuming from run_dir/.resume if it holds this fingerprint's
        state); None on ranks other than 0."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- sample
    def sample_reads(self, e: "Experiment") -> list[str]:
        raise NotImplementedError

    def sample_inputs(self, e: "Experiment") -> list[str]:
        return []

    def sample(self, e: "Experiment", device: "torch.device", rank: int, progress: bool,
               guidance_weight: float | None = None, count: int | None = None, seed: int | None = None,
               chunks: str = "chunks", checkpoint: "Path | None" = None) -> Sampled | None:
        """Draw the run's samples (resumable chunks under run_dir/`chunks`); None on ranks other than 0.
        `guidance_weight`, `count`, `seed` and `checkpoint` override sample.guidance.weight, the sample count,
        sample.seed and the run's model (a milestone's, for the FID curve)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- evaluate
    def classifier_reads(self, e: "Experiment") -> list[str]:
        """Params the classifier scores read (families with a likelihood)."""
        return []

    def classify(self, e: "Experiment", device: "torch.device", progress: bool) -> dict[str, float | None]:
        """The model's own classifier accuracies on metrics.classifier_split, in percent: `acc` (the training-free
        classifier) and `acc_exhaustive`; None where the family has no likelihood (or the score is off)."""
        return {"acc": None, "acc_exhaustive": None}

    def load(self, e: "Experiment", device: "torch.device"):
        """The trained model, frozen, for the probes (families with a likelihood): (model, checkpoint meta)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- plan
    def plan(self, e: "Experiment", world: int, budget: float | None) -> list[dict]:
        """Memory and FLOPs rows of this run's stages (flowback/plan)."""
        return []
