"""`flowback weights import`: a reference checkpoint (apple/ml-tarflow or ml-starflow) as a run's model.pt.

The run's model is what the params say (builders.flow_config of the run's merged params); the checkpoint must fit
it key for key (flowback.models.convert). The result is an ordinary FlowBack flow checkpoint, so the sample,
evaluate and probe stages read it like a trained one. Its meta records where it came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .builders import flow_config
from .checkpoints import save_flow
from .errors import FlowBackError
from .io import load_torch
from .models.convert import KINDS, WeightMappingError, convert
from .params import load_params


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_weights(kind: str, checkpoint: str | Path, params_path: str | Path, experiment: str,
                   overwrite: bool = False) -> Path:
    """Convert `checkpoint` (a `kind` state_dict, loaded with weights_only=True) into the model of run `experiment`
    (`<experiment>-s<seed>`, or an experiment with one seed) of `params_path`; write and return its model.pt."""
    if kind not in KINDS:
        raise FlowBackError(f"--from {kind!r}: expected one of {', '.join(KINDS)}")
    params = load_params(params_path)
    exp = params.run(params.resolve_run(experiment))
    if exp.family != "tarflow":
        raise FlowBackError(f"experiments.{exp.name}: family {exp.family!r} is not a normalizing flow; weights import "
                            f"needs a tarflow experiment")
    if not exp.trains:
        raise FlowBackError(f"experiments.{exp.name}: reads the model of {exp.milestone.of!r}; import into that run")
    dest = exp.checkpoint
    if dest.exists() and not overwrite:
        raise FlowBackError(f"{dest}: exists; pass --force to replace it with the imported weights")
    checkpoint = Path(checkpoint)
    try:
        model = convert(kind, load_torch(checkpoint), flow_config(exp.params))
    except WeightMappingError as e:
        raise WeightMappingError(f"{checkpoint}: {e}") from None
    save_flow(dest, model, experiment=exp.name, seed=exp.seed, strategy=exp.strategy, position=exp.position,
              imported_from=kind, source=str(checkpoint), source_sha256=_sha256(checkpoint))
    return dest
