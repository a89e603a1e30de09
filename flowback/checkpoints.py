"""Flow checkpoints: a dict of plain types and tensors (loadable with weights_only=True), checked against params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import FlowBackFileError, check_meta, load_torch, save_torch
from .models.tarflow import FlowConfig, TARFlow


def save_flow(path: str | Path, model: TARFlow, **meta: Any) -> None:
    save_torch(path, {**model.state(), "meta": meta})


def family_of(path: str | Path) -> str:
    """`af` for an adversarial flow's generator, `tarflow` for a flow (what the checkpoint says it holds)."""
    state = load_torch(path)
    return state.get("family", "tarflow") if isinstance(state, dict) else "tarflow"


def load_flow(path: str | Path, expected: FlowConfig | None = None, device: str = "cpu",
              expected_meta: dict | None = None) -> tuple[TARFlow, dict]:
    """Load a flow for inference (eval mode, parameters frozen: denoising and the classifier differentiate only with
    respect to their inputs, so no parameter gradients are kept); if `expected` is given, a checkpoint of another
    configuration is an error naming the file, and if `expected_meta` is, one of another run (check_meta)."""
    state = load_torch(path, map_location=device)
    if not isinstance(state, dict) or "config" not in state or "weights" not in state:
        raise FlowBackFileError(f"{path}: not a FlowBack flow checkpoint (no config/weights)")
    if state.get("family", "tarflow") != "tarflow":
        raise FlowBackFileError(f"{path}: holds a {state['family']!r} model, not a normalizing flow")
    try:
        cfg = FlowConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise FlowBackFileError(f"{path}: invalid model config in checkpoint ({e})") from e
    if expected is not None and cfg != expected:
        diff = {k: (getattr(cfg, k), getattr(expected, k)) for k in sorted(set(cfg.to_dict()) | set(expected.to_dict()))
                if getattr(cfg, k) != getattr(expected, k)}
        raise FlowBackFileError(f"{path}: checkpoint is from another model configuration; "
                                + ", ".join(f"{k}: checkpoint {a!r} vs params {b!r}" for k, (a, b) in diff.items()))
    check_meta(path, state.get("meta", {}), expected_meta)
    model = TARFlow(cfg)
    try:
        model.load_state_dict(state["weights"])
    except RuntimeError as e:
        raise FlowBackFileError(f"{path}: weights do not fit the model config ({e})") from e
    return model.to(device).eval().requires_grad_(False), state.get("meta", {})
