"""The training step's plan: micro-batch (gradient accumulation) and activation checkpointing for the budget."""

from __future__ import annotations

import torch

from ..params import Experiment
from .measure import EFFICIENT_MICRO, GIB, Choice, Measure, PlanError, _budget, _divisors, _fake, _largest, _memo, measure


def _encoder_dim(exp: Experiment) -> int:
    """The alignment encoder's feature size, from its config (no weights needed)."""
    import timm

    e = exp.params.encoder
    with torch.device("meta"):  # the architecture only: never a weights download
        net = timm.create_model(e.arch, pretrained=False, **e.kwargs)
    return int(net.num_features)


@_memo
def train_step(exp: Experiment, micro: int, checkpointing: bool) -> Measure:
    """One micro-batch of the real training step (after a first step, so AdamW's state exists), per GPU."""
    from ..alignment.objective import Objective, align_spec
    from ..training import TrainState, checkpoint_layers

    p = exp.params
    spec = align_spec(exp)
    enc_dim = _encoder_dim(exp) if spec else 0
    with _fake():
        state = TrainState(exp, enc_dim, torch.device("cpu"))
        if checkpointing:
            checkpoint_layers(state.model)
        obj = Objective.of(exp, state.model, state.projectors)
        cfg = state.model.cfg
        x = torch.randn(micro, cfg.channels, cfg.image_size, cfg.image_size)
        y = torch.randint(0, cfg.num_classes, (micro,))
        targets = torch.randn(micro, cfg.num_tokens, enc_dim) if spec else None
        autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=p.train.dtype == "bfloat16")
        params = state.parameters()

        def step():
            with torch.autocast(**autocast):
                loss, _, _ = obj(x, y, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)

        step()  # AdamW allocates its state on the first step
        return measure(step, state.model, state.projectors, state.optimizer, state.ema, x, y, targets)


def plan_train(exp: Experiment, world: int) -> Choice:
    """The micro-batch and checkpointing of a run's training step (as the params state, or chosen when `auto`)."""
    tp = exp.params.train
    budget = _budget(exp.params)
    share = tp.batch_size // world
    if tp.batch_size % world:
        raise PlanError(f"run {exp.run!r}: train.batch_size {tp.batch_size} does not split over {world} GPUs")
    if tp.micro_batch is None:
        cands = [share]
    elif tp.micro_batch == "auto":
        cands = _divisors(share)
    else:
        cands = [tp.micro_batch]
    if budget is None:
        if "auto" in (tp.micro_batch, tp.checkpointing):
            raise PlanError(f"run {exp.run!r}: train.micro_batch/checkpointing auto needs runtime.gpu_memory_gib "
                            f"(the memory budget per GPU the plan fits the step into)")
        m = cands[-1]
        return Choice(exp.run, "train", m, tp.checkpointing == "layers", share // m, Measure(0, 0), tp.steps)

    def choice(m: int, ckpt: bool) -> Choice:
        return Choice(exp.run, "train", m, ckpt, share // m, train_step(exp, m, ckpt), tp.steps)

    def largest(ckpt: bool) -> int | None:
        return _largest(cands, lambda m: train_step(exp, m, ckpt).peak <= budget)

    if tp.checkpointing == "auto":
        plain = largest(False)
        if plain is not None and plain >= min(EFFICIENT_MICRO, share):
            return choice(plain, False)
        ckpt = largest(True)
        if ckpt is not None and (plain is None or ckpt > plain):
            return choice(ckpt, True)
        if plain is not None:
            return choice(plain, False)
    else:
        best = largest(tp.checkpointing == "layers")
        if best is not None:
            return choice(best, tp.checkpointing == "layers")
    ckpt = tp.checkpointing != "none"
    need = train_step(exp, min(cands), ckpt).peak
    raise PlanError(f"run {exp.run!r}: the training step does not fit in runtime.gpu_memory_gib "
                    f"{exp.params.runtime.gpu_memory_gib} GiB even at micro-batch {min(cands)}"
                    f"{' with activation checkpointing' if ckpt else ''} ({need / GIB:.1f} GiB needed); use more "
                    f"GPUs (a smaller per-GPU share), train.micro_batch/checkpointing: auto, or a smaller model")


def resolve_train_plan(exp: Experiment, world: int, device: torch.device):
    """The StepPlan the train stage runs with; checked against the budget whenever runtime.gpu_memory_gib is set."""
    from ..training import StepPlan

    c = plan_train(exp, world)
    return StepPlan(c.value, c.accumulation, c.checkpointing)
