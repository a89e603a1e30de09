"""Training loops for adversarial flow models on in-memory images (the embedded digits profile).

`train_af` runs `af_train_step` over MemoryBatches (the same seeded per-epoch permutations the TARFlow runs use);
step k draws its noise from a generator seeded by (seed, k) and reads batch k (update: joint) or batches 2k (D) and
2k + 1 (G) (update: alternate), so a run resumed from a saved state at step s continues bit-identically to an
uninterrupted one. `train_flow_classifier` trains the time-conditioned classifier that
flow-based classifier guidance needs (AFTrainConfig.cg_weight > 0).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data.batches import MemoryBatches
from .errors import FlowBackError
from .io import FlowBackFileError, load_torch, save_torch
from .models.af import AFConfig, FlowClassifier
from .models.af_objective import AFState, AFTrainConfig, af_train_step, classifier_loss
from .progress import progress as tqdm
from .seeding import generator


class AFTrainingError(FlowBackError):
    """An adversarial-flow run that cannot continue (a non-finite loss)."""


def step_rng(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator every random draw of step `step` on `rank` comes from (each rank draws for its share)."""
    return generator("af-step", seed, step, rank)


def _meta(seed: int, batch: int, n: int) -> dict:
    return {"seed": int(seed), "batch": int(batch), "images": int(n)}


def load_af_state(path: str | Path, state: AFState, meta: dict) -> None:
    """Load a saved run into `state`; a file from another configuration, seed or data is an error naming it."""
    saved = load_torch(path, map_location=state.device)
    if not isinstance(saved, dict) or "state" not in saved or saved.get("meta") != meta:
        raise FlowBackFileError(f"{path}: not an AF training state of this run (meta {saved.get('meta')!r} "
                                f"vs {meta!r})" if isinstance(saved, dict) else f"{path}: not an AF training state")
    try:
        state.load_state_dict(saved["state"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise FlowBackFileError(f"{path}: AF state does not fit this run ({e})") from e


def train_af(
    cfg: AFConfig,
    images_u8: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    steps: int,
    batch: int,
    lr: float | None = None,
    seed: int = 0,
    train: AFTrainConfig | None = None,
    device: str | torch.device = "cpu",
    state_path: str | Path | None = None,
    checkpoint_every: int = 0,
    log_every: int = 50,
    classifier: FlowClassifier | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    batches=None,
    rank: int = 0,
    on_log: Callable[[list[dict]], None] | None = None,
) -> AFState:
    """Train an AF generator on uint8 NCHW images for `steps` steps (one D and one G update each) of `batch`; with
    `train.update` alternate each step reads two batches (one per update), as the reference's alternating iterations.

    `lr` overrides both learning rates of `train` (default AFTrainConfig()). With `state_path`, the state is saved
    there every `checkpoint_every` steps and at the end (by rank 0), and a run finds it and resumes. Returns the state;
    its `ema` is the generator to sample from, its `log` has one row every `log_every` steps. `batches` (a Batches
    source bound to this rank, e.g. ShardBatches for ImageNet) replaces the in-memory images; under torchrun every
    rank takes its share of the batch and gradients are averaged over the ranks."""
    train = train or AFTrainConfig()
    if lr is not None:
        train = replace(train, lr_g=lr, lr_d=lr)
    state = AFState(cfg, train, seed=seed, device=device, classifier=classifier)
    if batches is None:
        images, labs = torch.as_tensor(images_u8), torch.as_tensor(labels).long()
        batches = MemoryBatches(images, labs, batch, seed)
        meta = _meta(seed, batch, len(images))
    else:
        meta = _meta(seed, batch, -1)
    if state_path is not None and Path(state_path).exists():
        load_af_state(state_path, state, meta)

    def save() -> None:
        if state_path is not None and rank == 0:
            save_torch(state_path, {"meta": meta, "state": state.state_dict()})

    done = state.step
    bar = tqdm(range(state.step, steps), initial=state.step, total=steps, desc="train af",
               disable=not show_progress or rank != 0)
    for step in bar:
        if train.update == "alternate":  # the reference's order: D and G each take their own batch of the stream
            b, bg = batches.get(2 * step), batches.get(2 * step + 1)
            stats = af_train_step(state, b.x, b.y, step_rng(seed, step, rank), g_batch=(bg.x, bg.y))
        else:
            b = batches.get(step)
            stats = af_train_step(state, b.x, b.y, step_rng(seed, step, rank))
        logs = (step + 1) % log_every == 0 or step + 1 == steps
        saves = checkpoint_every and (step + 1) % checkpoint_every == 0
        if logs or saves:  # the host sync, at log and checkpoint steps only: nothing non-finite is ever saved
            stats = {k: float(v) for k, v in stats.items()}
            if not all(math.isfinite(v) for v in stats.values()):
                raise AFTrainingError(f"AF training: non-finite loss at or before step {step + 1} ({stats}); lower "
                                      f"the learning rate or raise the OT weight")
        if logs:
            state.log.append({"step": step + 1, **stats})
            bar.set_postfix(d=f"{stats['d_loss']:.3f}", g=f"{stats['g_loss']:.3f}", ot=f"{stats['ot']:.3f}",
                            refresh=False)
            if on_log is not None and rank == 0:
                on_log(state.log)
        if saves:
            save()
        if on_step is not None:
            on_step(step + 1)
    if state.step > done:
        save()
    return state


def train_flow_classifier(
    cfg: AFConfig,
    images_u8: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    steps: int,
    batch: int,
    lr: float = 1e-4,
    seed: int = 0,
    width: int | None = None,
    depth: int | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.01,
    ema_decay: float = 0.0,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
) -> FlowClassifier:
    """The classifier C(x_t, t) of flow-based guidance, trained by cross-entropy on x_t = (1 - t) x + t eps,
    t ~ U(0, 1) (defaults: the paper's AdamW settings). Returns the EMA weights when ema_decay > 0."""
    images, labs = torch.as_tensor(images_u8), torch.as_tensor(labels).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FlowClassifier(cfg, width, depth).to(device)
    ema = copy.deepcopy(net).requires_grad_(False) if ema_decay > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    batches = MemoryBatches(images, labs, batch, seed)
    for step in tqdm(range(steps), desc="train flow classifier", disable=not show_progress):
        b = batches.get(step)
        loss = classifier_loss(net, b.x.to(device), b.y.to(device), step_rng(seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - ema_decay)
    return (ema if ema is not None else net).eval().requires_grad_(False)
