"""Training loop for a flow with optional representation alignment: deterministic, resumable, crash-safe.

Determinism: every random draw of step s (batch indices, dequantisation noise, label drop) comes from a generator
seeded by (seed, s), and batches walk seeded per-epoch permutations. So a run resumed from a checkpoint at step s
takes exactly the steps an uninterrupted run would: on CPU the weights come out bit-identical.

Safety: the resume state (model, projectors, optimizer, EMA, log) is written atomically every `checkpoint_every`
steps, so a kill loses at most that many steps; a non-finite loss stops the run with a message and leaves the last
good state on disk.
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
from .data.images import to_model
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


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices for `step`: consecutive slices of per-epoch permutations (an epoch is ceil(n / batch) steps)."""
    pos, out = step * batch, []
    while sum(len(o) for o in out) < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch - sum(len(o) for o in out), n - offset)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


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


def train(
    exp: Experiment,
    images_u8: torch.Tensor,
    labels: torch.Tensor,
    state_path: str | Path,
    encoder: FrozenEncoder | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train exp's flow on in-memory uint8 NCHW images; resume from `state_path` if it holds a matching state.

    `on_step(step)` is called after each completed step (tests use it to simulate a crash).
    """
    p = exp.params
    tp = p.train
    set_threads(tp.threads)
    dev = pick_device(tp.device)
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
        save_torch(state_path, {"fingerprint": fp, "step": step, "model": model.state_dict(),
                                "projectors": projectors.state_dict(), "optimizer": opt.state_dict(),
                                "ema": ema.state_dict() if ema is not None else {}, "log": log})

    targets = None
    if spec is not None:
        encoder = encoder.to(dev)
        targets = encode_targets(encoder, images_u8.to(dev), model.cfg.grid)

    n, B = len(images_u8), tp.batch_size
    sigma, drop = p.model.noise_std, p.model.label_drop
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(start, tp.steps), initial=start, total=tp.steps, desc=f"train {exp.name}",
               disable=not show_progress)
    for step in bar:
        g = step_generator(tp.seed, step)
        idx = batch_indices(step, n, B, tp.seed)
        x = to_model(images_u8[idx]).to(dev)
        x = x + sigma * torch.randn(x.shape, generator=g).to(dev)
        y = labels[idx].clone()
        y[torch.rand(B, generator=g) < drop] = -1
        y = y.to(dev)
        lr = learning_rate(step, tp.lr, tp.min_lr, tp.warmup_steps, tp.steps)
        for group in opt.param_groups:
            group["lr"] = lr

        tgt = targets[idx.to(dev)] if spec is not None else None
        loss, nll, align = objective(model, projectors, spec, x, y, tgt, p.align.weight)
        if not torch.isfinite(loss):
            raise TrainingError(f"experiment {exp.name!r}: non-finite loss at step {step + 1} (nll={nll.item()}, "
                                f"align={align.item()}); the last good state is {state_path} — lower train.lr or "
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
            row = {"step": step + 1, "loss": loss.item(), "bpd": float(bits_per_dim(nll.item())),
                   "align": align.item(), "lr": lr, "grad_norm": float(grad_norm)}
            log.append(row)
            bar.set_postfix(bpd=f"{row['bpd']:.3f}", align=f"{row['align']:.3f}", refresh=False)
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
        "params_millions": sum(q.numel() for q in model.parameters()) / 1e6,
    }
    return TrainResult(final, projectors, log, tp.steps, seconds, start, summary)
