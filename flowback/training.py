"""Training a flow with optional representation alignment: deterministic, resumable, crash-safe, memory-planned.

The loop is a few named parts:
- `TrainState`: model, projectors, optimizer, EMA, step and log, under the run's fingerprint; it saves and restores
  itself (the loss is flowback/alignment/objective.py's `Objective.of(experiment)`).
- a `Batches` source (flowback/data/batches.py): `get(step)` is this rank's share of step s's global batch.
- `step_inputs`: the noise and label drop of step s, drawn for the global batch on the device and sliced to this rank,
  so 1 and N processes train on the same noisy global batches.
- `StepPlan`: the rank's share split into micro-batches (gradient accumulation) with or without per-layer activation
  checkpointing, as the memory plan (flowback/plan/) chooses; k micro-batches give the gradient of one batch.

Determinism: every random draw of step s comes from `derive_seed(stream, seed, s)`, and batches walk seeded
per-epoch permutations, so a run resumed from a checkpoint takes exactly the steps an uninterrupted run would: on CPU
the weights come out bit-identical. Validation (`train.val_every`) draws nothing at run time: its images and noise are
fixed up front from their own seed, so training with it on or off gives the same weights.

Safety: the resume state is written atomically every `checkpoint_every` steps (rank 0 only, streamed to disk), so a
kill loses at most that many steps. A non-finite loss is detected on the device without a per-step host sync and
reported at the next log or checkpoint step, before anything is saved: the last good state stays on disk. A resume
state of another configuration is set aside as `.stale`, an unreadable one as `.corrupt`, each with a message; only
rank 0 renames, and the step to resume from is broadcast from rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .alignment.encoder import FrozenEncoder
from .alignment.objective import AlignTargets, Objective, align_spec, make_projectors
from .builders import flow_config
from .checkpoints import save_flow
from .data.batches import Batch, Batches
from .data.images import to_model
from .distributed import barrier, broadcast_int
from .errors import FlowBackError, Interrupted
from .io import FlowBackFileError, load_torch, save_torch
from .models.tarflow import TARFlow, bits_per_dim
from .models.transformer import Layer
from .params import Experiment
from .progress import progress as tqdm
from .schedule import learning_rate
from .seeding import derive_seed, generator


class TrainingError(FlowBackError):
    """Training cannot go on (non-finite loss, mismatched resume state); the message says what to do."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training: the state on disk is intact, so the message says where a rerun resumes."""

    def __init__(self, step: int, saved: int, state_path: Path):
        self.step, self.saved = step, saved
        then = (f"rerun resumes from step {saved} (the last saved state, {state_path})" if saved else
                "no state was saved yet (train.checkpoint_every): rerun starts from step 0")
        super().__init__(f"interrupted at step {step}; {then}")


# ----------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StepPlan:
    """How one rank takes its share of a step: `micro_batch` images per forward/backward, `accumulation` of them."""

    micro_batch: int
    accumulation: int = 1
    checkpointing: bool = False

    @property
    def share(self) -> int:
        return self.micro_batch * self.accumulation


def fixed_plan(exp: Experiment, world: int) -> StepPlan:
    """The plan the params state outright (micro_batch an int or null, checkpointing none/layers); `auto` values
    need flowback.plan.train.resolve_train_plan, which measures."""
    tp = exp.params.train
    share = tp.batch_size // world
    micro = share if tp.micro_batch is None else tp.micro_batch
    if not isinstance(micro, int):
        raise ValueError("micro_batch auto needs the memory plan (flowback.plan.train.resolve_train_plan)")
    if share % micro:
        raise TrainingError(f"experiment {exp.name!r}: train.micro_batch {micro} does not divide the per-rank batch "
                            f"{share} (train.batch_size {tp.batch_size} over {world} processes)")
    return StepPlan(micro, share // micro, tp.checkpointing == "layers")


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute every transformer layer's activations in backward (non-reentrant: the alignment strategies run
    blocks again after the forward pass). State-dict keys are unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, Layer))


# ---------------------------------------------------------------------------------------------------------- state
def _on(module: nn.Module, device: torch.device) -> nn.Module:
    """Move to `device` unless already there (the memory plan builds states under fake tensors, which must not be
    copied)."""
    first = next(iter(module.parameters()), None)
    return module if first is None or first.device == device else module.to(device)


class TrainState:
    """Everything a run needs to continue: model, projectors, optimizer, EMA, step and log."""

    def __init__(self, exp: Experiment, encoder_dim: int, device: torch.device, fingerprint: str = ""):
        """`fingerprint`: what the run's resume state must match (the train stage hashes the params it reads)."""
        p, tp = exp.params, exp.params.train
        torch.manual_seed(derive_seed("init", tp.seed))
        self.exp, self.spec = exp, align_spec(exp)
        self.model = _on(TARFlow(flow_config(p)), device)
        hidden = p.align.projector_dim if self.spec else 0
        self.projectors = _on(make_projectors(self.spec, p.model.width, hidden, encoder_dim), device)
        # fused: one kernel for every parameter (CPU and CUDA); the per-parameter loop took a fifth of a small step
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=tp.lr, betas=tuple(tp.betas),
                                           weight_decay=tp.weight_decay, fused=device.type in ("cpu", "cuda"))
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if tp.ema_decay > 0 else None
        self.step, self.log = 0, []
        self.fingerprint = fingerprint

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + list(self.projectors.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "step": self.step, "model": self.model.state_dict(),
                "projectors": self.projectors.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else {}, "log": self.log}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.model.load_state_dict(st["model"])
        self.projectors.load_state_dict(st["projectors"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.step, self.log = int(st["step"]), list(st["log"])

    def save(self, path: Path) -> None:
        save_torch(path, self.state_dict())

    def update_ema(self, decay: float) -> None:
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)

    @property
    def final_model(self) -> TARFlow:
        return self.ema if self.ema is not None else self.model

    def restore(self, path: Path, rank: int, device: torch.device) -> int:
        """Continue from `path` if it holds this run's state; returns the step to continue from (0: from scratch).

        Rank 0 decides: a state of another configuration is set aside as `<path>.stale`, an unreadable one as
        `<path>.corrupt`, each with a message; the decision is broadcast and the other ranks load the same file."""
        step = 0
        if rank == 0 and path.exists():
            try:
                st = load_torch(path, map_location=device)
                if not isinstance(st, dict) or "fingerprint" not in st:
                    raise FlowBackFileError(f"{path}: not a FlowBack training state")
            except FlowBackFileError as e:
                _set_aside(path, ".corrupt", f"cannot be read ({e})")
                st = None
            if st is not None and st["fingerprint"] != self.fingerprint:
                _set_aside(path, ".stale", "was saved by another configuration")
                st = None
            if st is not None:
                self.load_state_dict(st)
                step = self.step
        step = broadcast_int(step, device)
        barrier()  # the renames are done before any rank looks at the file
        if rank != 0 and step:
            self.load_state_dict(load_torch(path, map_location=device))
        return step


def _set_aside(path: Path, suffix: str, why: str) -> None:
    moved = path.with_name(path.name + suffix)
    path.replace(moved)
    print(f"note: {path} {why}; moved to {moved}, starting over")


def step_inputs(batch: Batch, step: int, exp: Experiment, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy x, label-dropped y) of this rank for `step`: noise and drop mask are drawn for the global batch on the
    batch's device from the step's own seed, then sliced, so the draws do not depend on the number of ranks."""
    p = exp.params
    B, b = p.train.batch_size, len(batch.x)
    mine = slice(rank * b, (rank + 1) * b)
    dev = batch.x.device
    g = generator("noise", p.train.seed, step, device=dev)
    noise = torch.randn((B, *batch.x.shape[1:]), generator=g, device=dev)[mine]
    drop = (torch.rand(B, generator=g, device=dev) < p.model.label_drop)[mine]
    y = torch.where(drop, torch.full_like(batch.y, -1), batch.y)
    return batch.x + p.model.noise_std * noise, y


def accumulate_gradients(objective_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
                         plan: StepPlan, ddp: nn.parallel.DistributedDataParallel | None = None,
                         autocast: dict | None = None) -> torch.Tensor:
    """Backward of the rank's share in `plan.accumulation` micro-batches; the gradients are those of the mean loss
    over the share (each micro-batch's mean loss weighs 1/accumulation). DDP all-reduces only on the last one.
    Returns the share's (loss, nll, align) means."""
    autocast = autocast or {"device_type": x.device.type, "enabled": False}
    stats = torch.zeros(3, device=x.device)
    m = plan.micro_batch
    for j in range(plan.accumulation):
        part = slice(j * m, (j + 1) * m)
        sync = ddp is None or j == plan.accumulation - 1
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            with torch.autocast(**autocast):
                loss, nll, align = objective_fn(x[part], y[part], targets[part] if targets is not None else None)
            (loss / plan.accumulation).backward()
        stats += torch.stack([loss.detach(), nll.detach(), align.detach()]).float() / plan.accumulation
    return stats


# ----------------------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ValidationSet:
    """The fixed validation inputs: model-space images with their noise already added, and their labels."""

    x: torch.Tensor
    y: torch.Tensor


def validation_set(inputs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, n: int, seed: int,
                   noise_std: float) -> ValidationSet:
    """The first `n` of a seeded permutation of the val split (uint8 images or model-space latents), each with one
    fixed noise draw (the training noise's scale): the same set at every validation step, on every rank and resume.
    Its own generators: no random stream of the training is touched."""
    t = torch.as_tensor(inputs)
    x = to_model(t) if t.dtype == torch.uint8 else t.float()
    pick = torch.randperm(len(x), generator=generator("val-subset", seed))[:n]
    x = x[pick]
    noise = torch.randn(x.shape, generator=generator("val-noise", seed))
    return ValidationSet(x + noise_std * noise, torch.as_tensor(labels)[pick].long())


def load_validation(params) -> ValidationSet:
    """The run's validation set from the prepared val split: its images, or in latent mode the un-flipped posterior
    means (what the flow models, as the classifier reads them)."""
    from .data.manifest import check_prepared, load_split, read_latents

    if params.model.latent is None:
        inputs, labels = load_split(params, "val")
    else:
        check_prepared(params)
        latents = read_latents(params.data.dir, "val")
        inputs, labels = np.ascontiguousarray(latents["mean"][:, 0], dtype=np.float32), latents["label"]
    return validation_set(inputs, labels, params.train.val_images, params.train.seed, params.model.noise_std)


@torch.no_grad()
def validation_bpd(model: TARFlow, val: ValidationSet, batch: int, autocast: dict) -> float:
    """Bits/dim of `model` on `val` (its class labels, no label drop), in eval mode, restoring the model's mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(val.x), batch):
        x, y = val.x[i:i + batch].to(device), val.y[i:i + batch].to(device)
        with torch.autocast(**autocast):
            total += float(model.nll_per_dim(model(x, y))) * len(x)
    model.train(was_training)
    return float(bits_per_dim(total / len(val.x)))


# ----------------------------------------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    model: TARFlow  # EMA weights when EMA is on
    projectors: nn.ModuleDict
    log: list[dict[str, float]]
    steps: int
    seconds: float
    resumed_from: int = 0
    summary: dict[str, Any] = field(default_factory=dict)  # science: final bpd, alignment loss, size
    timing: dict[str, Any] = field(default_factory=dict)  # how long it took: not a metric


def train(
    exp: Experiment,
    batches: Batches,
    state_path: str | Path,
    fingerprint: str,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    encoder: FrozenEncoder | None = None,
    fixed_images: torch.Tensor | None = None,
    plan: StepPlan | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_log: Callable[[list[dict]], None] | None = None,
    milestones: dict[int, Path] | None = None,
    val: ValidationSet | None = None,
) -> TrainResult:
    """Train exp's flow on `batches` (this rank's view); resume from `state_path` if it holds a state saved under the
    same `fingerprint` (the train stage's hash of the params that define the run; another one is set aside).

    `fixed_images`: the in-memory training set (uint8), whose alignment targets are then computed once.
    `milestones`: {step: path} where rank 0 saves the model (the EMA one if kept) after that step, like model.pt.
    `val`: with train.val_every > 0, rank 0 logs `val_bpd` (validation_bpd of the model model.pt would hold: the EMA
    one if kept) every val_every steps and at the last; the log's other rows hold None there.
    `on_step(step)` is called after each completed step (tests use it to simulate a crash); `on_log(log)` with the
    whole log so far after each new row, on rank 0 (the train stage writes train_log.csv from it).
    """
    p, tp = exp.params, exp.params.train
    if tp.batch_size % world:
        raise TrainingError(f"train.batch_size {tp.batch_size} does not split over {world} processes")
    spec = align_spec(exp)
    if spec is not None and encoder is None:
        raise TrainingError(f"experiment {exp.name!r} aligns ({exp.strategy}) but no encoder was given")
    plan = plan or fixed_plan(exp, world)
    if plan.share != tp.batch_size // world:
        raise TrainingError(f"experiment {exp.name!r}: plan {plan} does not cover the per-rank batch "
                            f"{tp.batch_size // world}")

    state = TrainState(exp, encoder.dim if encoder else 0, device, fingerprint)
    state_path = Path(state_path)
    start = state.restore(state_path, rank, device)
    milestones = {int(k): Path(v) for k, v in (milestones or {}).items()}
    passed = [k for k, v in sorted(milestones.items()) if k <= start and not v.exists()]
    if passed:
        raise TrainingError(f"run {exp.run!r}: milestone step {passed[0]} was added after the run passed it (it resumes "
                            f"at step {start}); delete {state_path} to train again from the start")
    if plan.checkpointing:
        checkpoint_layers(state.model)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tp.dtype == "bfloat16")
    targets = (AlignTargets(encoder, state.model.cfg.grid, device, autocast, fixed_images, p.align.target_grid)
               if spec else None)

    objective_fn: nn.Module = Objective.of(exp, state.model, state.projectors)
    ddp = None
    if world > 1:
        ddp = objective_fn = nn.parallel.DistributedDataParallel(
            objective_fn, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if tp.compile:
        objective_fn = torch.compile(objective_fn)

    params = state.parameters()
    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # first step with a non-finite loss (0: none)
    grad_norm = torch.zeros((), device=device)
    t0 = time.perf_counter()
    state.model.train()
    bar = tqdm(range(start, tp.steps), initial=start, total=tp.steps, desc=f"train {exp.run}",
               disable=not show_progress or rank != 0)

    def check_finite(step: int) -> None:
        bad = int(first_bad.item())  # the one host sync, at log and checkpoint steps only
        if bad:
            raise TrainingError(f"run {exp.run!r}: non-finite loss at step {bad} (found at step {step}); the last good "
                                f"state is {state_path} - lower train.lr or raise train.grad_clip, then re-run to "
                                f"resume")

    saved = start  # the step of the state on disk: where a rerun resumes
    try:
        for step in bar:
            batch = batches.get(step).to(device)
            x, y = step_inputs(batch, step, exp, rank, world)
            tgt = targets(batch) if targets is not None else None
            lr = learning_rate(step, tp.lr, tp.min_lr, tp.warmup_steps, tp.steps)
            for group in state.optimizer.param_groups:
                group["lr"] = lr

            state.optimizer.zero_grad(set_to_none=True)
            stats = accumulate_gradients(objective_fn, x, y, tgt, plan, ddp, autocast)
            if world > 1:
                torch.distributed.all_reduce(stats)
                stats /= world
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(stats).all(), step + 1, first_bad)
            grad_norm = nn.utils.clip_grad_norm_(params, tp.grad_clip if tp.grad_clip > 0 else float("inf"))
            state.optimizer.step()
            state.update_ema(tp.ema_decay)
            state.step = step + 1

            last = step + 1 == tp.steps
            if (step + 1) % tp.log_every == 0 or last:
                check_finite(step + 1)
                loss_v, nll_v, align_v = stats.tolist()
                row = {"step": step + 1, "loss": loss_v, "bpd": float(bits_per_dim(nll_v)), "align": align_v, "lr": lr,
                       "grad_norm": float(grad_norm)}
                if tp.val_every:
                    due = val is not None and rank == 0 and ((step + 1) % tp.val_every == 0 or last)
                    row["val_bpd"] = validation_bpd(state.final_model, val, plan.micro_batch, autocast) if due else None
                state.log.append(row)
                bar.set_postfix(bpd=f"{row['bpd']:.3f}", align=f"{row['align']:.3f}", refresh=False)
                if on_log is not None and rank == 0:
                    on_log(state.log)
            if (step + 1) % tp.checkpoint_every == 0 or last:
                check_finite(step + 1)
                if rank == 0:
                    state.save(state_path)
                saved = step + 1
            if step + 1 in milestones and rank == 0:
                save_flow(milestones[step + 1], state.final_model, experiment=exp.name, seed=exp.seed,
                          strategy=exp.strategy, position=exp.position, steps=step + 1)
            if on_step is not None:
                on_step(step + 1)
    except KeyboardInterrupt:
        bar.close()
        raise TrainingInterrupted(state.step, saved, state_path) from None
    seconds = time.perf_counter() - t0

    final = state.final_model
    final.eval()
    log = state.log
    tail = log[-max(1, len(log) // 5):]
    summary = {
        "steps": tp.steps,
        "final_bpd": float(np.mean([r["bpd"] for r in tail])),
        "final_align": float(np.mean([r["align"] for r in tail])) if spec else None,
        "final_val_bpd": next((r["val_bpd"] for r in reversed(log) if r.get("val_bpd") is not None), None),
        "params_millions": sum(q.numel() for q in state.model.parameters()) / 1e6,
    }
    timing = {
        "resumed_from": start,
        "seconds": seconds,
        "steps_per_second": (tp.steps - start) / seconds if seconds > 0 else None,
        "images_per_second": (tp.steps - start) * tp.batch_size / seconds if seconds > 0 else None,
        "processes": world,
        "micro_batch": plan.micro_batch,
        "accumulation": plan.accumulation,
        "checkpointing": plan.checkpointing,
    }
    return TrainResult(final, state.projectors, log, tp.steps, seconds, start, summary, timing)
