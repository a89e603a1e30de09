"""Training loop for a flow with optional representation alignment: deterministic, resumable, crash-safe.

Determinism: every random draw of step s (batch indices, dequantisation noise, label drop) comes from a generator
seeded by (seed, s), and batches walk seeded per-epoch permutations. So a run resumed from a checkpoint at step s
takes exactly the steps an uninterrupted run would: on CPU the weights come out bit-identical.

Safety: the resume state (model, projectors, optimizer, EMA, log) is written atomically every `checkpoint_every`
steps, so a kill loses at most that many steps; a non-finite loss stops the run with a message and leaves the last
good state on disk.

Scale: under torchrun (WORLD_SIZE > 1) every rank computes its part of the global batch and DDP averages the
gradients; the noise and label-drop draws are made for the global batch and sliced, so 1 and N processes train on
the same global batches. `train.dtype: bfloat16` runs the objective under autocast; `train.compile` wraps it in
torch.compile. Batches come from memory (flowback.data.batches.MemoryBatches) or are streamed from shards
(ShardBatches) for ImageNet.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from .progress import progress as tqdm

from .alignment import AlignSpec, FrozenEncoder, Projector, alignment_features, alignment_loss, match_grid
from .builders import align_spec, device as pick_device, flow_config, set_threads
from .data.batches import MemoryBatches, batch_indices  # noqa: F401 (batch_indices: re-exported)
from .data.images import to_model
from .distributed import setup
from .errors import FlowBackError
from .io import load_torch, save_torch
from .models import TARFlow, bits_per_dim
from .params import Experiment


class TrainingError(FlowBackError):
    """Training cannot go on (non-finite loss, mismatched resume state); the message says what to do."""


@dataclass
class TrainResult:
    model: TARFlow  # EMA weights when EMA is on
    projectors: nn.ModuleDict
    log: list[dict[str, float]]
    steps: int
    seconds: float
    resumed_from: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


def fingerprint(exp: Experiment) -> str:
    """Hash of everything that shapes a run, so a resume state from another configuration is never reused."""
    payload = {"name": exp.name, "strategy": exp.strategy, "positions": exp.positions,
               "params": exp.params.model_dump(mode="json", exclude={"experiments", "sample", "metrics"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def encode_targets(encoder: FrozenEncoder, images_u8: torch.Tensor, grid: int, batch: int = 256) -> torch.Tensor:
    """Encoder patch features of clean images, resized to the flow's token grid: (N, grid*grid, E)."""
    out = [match_grid(encoder(to_model(images_u8[i : i + batch])), grid) for i in range(0, len(images_u8), batch)]
    return torch.cat(out)


def make_projectors(spec: AlignSpec | None, width: int, hidden: int, enc_dim: int) -> nn.ModuleDict:
    if spec is None:
        return nn.ModuleDict()
    return nn.ModuleDict({AlignSpec.key(p): Projector(width, hidden, enc_dim) for p in spec.positions})


def objective(model: TARFlow, projectors: nn.ModuleDict, spec: AlignSpec | None, x: torch.Tensor, y: torch.Tensor,
              targets: torch.Tensor | None, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's loss = NLL (nats/dim) + weight * mean alignment loss over positions; returns (loss, nll, align)."""
    out = model(x, y, keep=spec.forward_keep if spec else None, keep_inputs=bool(spec and spec.needs_block_inputs))
    nll = model.nll_per_dim(out)
    if spec is None:
        return nll, nll, torch.zeros((), device=x.device)
    feats = alignment_features(model, out, model.conditions(y, None, len(x)), spec)
    align = torch.stack([alignment_loss(projectors[AlignSpec.key(k)](h), targets) for k, h in feats.items()]).mean()
    return nll + weight * align, nll, align


class Objective(nn.Module):
    """The whole training loss as one module, so DDP sees every parameter used inside one forward call (the
    alignment strategies call into the flow's blocks again after its forward pass)."""

    def __init__(self, model: TARFlow, projectors: nn.ModuleDict, spec: AlignSpec | None, weight: float):
        super().__init__()
        self.model, self.projectors, self.spec, self.weight = model, projectors, spec, weight

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None):
        return objective(self.model, self.projectors, self.spec, x, y, targets, self.weight)


def train(
    exp: Experiment,
    images_u8: torch.Tensor | None,
    labels: torch.Tensor | None,
    state_path: str | Path,
    encoder: FrozenEncoder | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    batches=None,
    on_log: Callable[[list[dict]], None] | None = None,
) -> TrainResult:
    """Train exp's flow; resume from `state_path` if it holds a matching state.

    Data: in-memory uint8 NCHW `images_u8` and `labels`, or a `batches` source (ShardBatches) for streamed data.
    `on_step(step)` is called after each completed step (tests use it to simulate a crash); `on_log(log)` with the
    whole log so far after each new row, on rank 0 (the train stage feeds dvclive from it).
    """
    p = exp.params
    tp = p.train
    set_threads(tp.threads)
    dev, rank, world = setup(pick_device(tp.device))
    if tp.batch_size % world:
        raise TrainingError(f"train.batch_size {tp.batch_size} does not split over {world} processes")
    spec = align_spec(exp)
    if spec is not None and encoder is None:
        raise TrainingError(f"experiment {exp.name!r} aligns ({exp.strategy}) but no encoder was given")

    torch.manual_seed(tp.seed)
    model = TARFlow(flow_config(p)).to(dev)
    projectors = make_projectors(spec, p.model.width, p.align.projector_dim, encoder.dim if encoder else 0).to(dev)
    params = list(model.parameters()) + list(projectors.parameters())
    opt = torch.optim.AdamW(params, lr=tp.lr, betas=tuple(tp.betas), weight_decay=tp.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if tp.ema_decay > 0 else None

    state_path = Path(state_path)
    fp = fingerprint(exp)
    start, log = 0, []
    st = load_torch(state_path, map_location=dev) if state_path.exists() else None
    if st is not None and st.get("fingerprint") != fp:
        stale = state_path.with_suffix(".stale")
        state_path.replace(stale)
        print(f"note: {state_path} was saved by another configuration; moved to {stale}, starting over")
        st = None
    if st is not None:
        model.load_state_dict(st["model"])
        projectors.load_state_dict(st["projectors"])
        opt.load_state_dict(st["optimizer"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        start, log = int(st["step"]), list(st["log"])

    def save_state(step: int) -> None:
        if rank != 0:
            return
        save_torch(state_path, {"fingerprint": fp, "step": step, "model": model.state_dict(),
                                "projectors": projectors.state_dict(), "optimizer": opt.state_dict(),
                                "ema": ema.state_dict() if ema is not None else {}, "log": log})

    if batches is None:
        batches = MemoryBatches(images_u8, labels, tp.batch_size, tp.seed)
    targets = None
    if spec is not None:
        encoder = encoder.to(dev)
        if isinstance(batches, MemoryBatches):  # a fixed image set: its encoder features once, not every step
            targets = encode_targets(encoder, batches.images.to(dev), model.cfg.grid)

    objective_fn: nn.Module = Objective(model, projectors, spec, p.align.weight)
    if world > 1:
        objective_fn = nn.parallel.DistributedDataParallel(objective_fn, device_ids=[dev.index] if dev.type == "cuda"
                                                           else None)
    if tp.compile:
        objective_fn = torch.compile(objective_fn)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=tp.dtype == "bfloat16")

    B, b = tp.batch_size, tp.batch_size // world
    sigma, drop = p.model.noise_std, p.model.label_drop
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(start, tp.steps), initial=start, total=tp.steps, desc=f"train {exp.name}",
               disable=not show_progress or rank != 0)
    for step in bar:
        g = step_generator(tp.seed, step)
        batch = batches.get(step, rank, world)
        mine = slice(rank * b, (rank + 1) * b)
        x = batch.x.to(dev)
        x = x + sigma * torch.randn((B, *x.shape[1:]), generator=g)[mine].to(dev)
        y = batch.y.clone()
        y[(torch.rand(B, generator=g) < drop)[mine]] = -1
        y = y.to(dev)
        lr = learning_rate(step, tp.lr, tp.min_lr, tp.warmup_steps, tp.steps)
        for group in opt.param_groups:
            group["lr"] = lr

        tgt = None
        if spec is not None:
            if targets is not None:
                tgt = targets[batch.index.to(dev)]
            else:
                tgt = encode_targets(encoder, batch.pixels.to(dev), model.cfg.grid)
        with torch.autocast(**amp):
            loss, nll, align = objective_fn(x, y, tgt)
        stats = torch.stack([loss.detach(), nll.detach(), align.detach()]).float()
        if world > 1:
            torch.distributed.all_reduce(stats)
            stats /= world
        if not torch.isfinite(stats).all():
            raise TrainingError(f"experiment {exp.name!r}: non-finite loss at step {step + 1} (nll={stats[1].item()}, "
                                f"align={stats[2].item()}); the last good state is {state_path} — lower train.lr or "
                                f"raise train.grad_clip, then re-run to resume")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, tp.grad_clip if tp.grad_clip > 0 else float("inf"))
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - tp.ema_decay)

        if (step + 1) % tp.log_every == 0 or step + 1 == tp.steps:
            row = {"step": step + 1, "loss": stats[0].item(), "bpd": float(bits_per_dim(stats[1].item())),
                   "align": stats[2].item(), "lr": lr, "grad_norm": float(grad_norm)}
            log.append(row)
            bar.set_postfix(bpd=f"{row['bpd']:.3f}", align=f"{row['align']:.3f}", refresh=False)
            if on_log is not None and rank == 0:
                on_log(log)
        if (step + 1) % tp.checkpoint_every == 0 or step + 1 == tp.steps:
            save_state(step + 1)
        if on_step is not None:
            on_step(step + 1)
    seconds = time.perf_counter() - t0

    final = ema if ema is not None else model
    final.eval()
    tail = log[-max(1, len(log) // 5):]
    summary = {
        "steps": tp.steps,
        "resumed_from": start,
        "final_bpd": float(np.mean([r["bpd"] for r in tail])),
        "final_align": float(np.mean([r["align"] for r in tail])) if spec else None,
        "seconds": seconds,
        "steps_per_second": (tp.steps - start) / seconds if seconds > 0 else None,
        "images_per_second": (tp.steps - start) * tp.batch_size / seconds if seconds > 0 else None,
        "processes": world,
        "params_millions": sum(q.numel() for q in model.parameters()) / 1e6,
    }
    return TrainResult(final, projectors, log, tp.steps, seconds, start, summary)
