"""An adversarial flow's training step, checked against the budget (its own module, so a flow run's plan - and its
stages' code dependencies - hold none of the adversarial flow's code)."""

from __future__ import annotations

import torch

from ..params import Experiment
from .budget import CUBLAS_WORKSPACE, attention_scratch, outside_allocator, usable
from .measure import GIB, Choice, Measure, PlanError, _fake, _memo, counting


@_memo("sample", "metrics", "model", "train", "align", "encoder", strategy=False)
def af_train_step(exp: Experiment, world: int, batch: int, cfg, train_cfg) -> Measure:
    """One step of an adversarial flow (a D update and a G update) on `batch` images, after a first step; `cfg` and
    `train_cfg` are the run's AFConfig and AFTrainConfig (its family builds them). Its gradients are all-reduced one
    by one (af_objective.py), with no DDP buffer."""
    from ..models.af_objective import AFState
    from ..models.af_objective import af_train_step as af_step_fn

    with _fake():
        state = AFState(cfg, train_cfg, seed=0, device=None)
        # deepcopy (AFState's EMA) gives a fake module its own fake mode: rebuild the EMA in this one
        state.ema = type(state.generator)(cfg).eval().requires_grad_(False)
        x = torch.randn(batch, *cfg.image_shape)
        y = torch.randint(0, cfg.num_classes, (batch,))
        rng = torch.Generator().manual_seed(0)

        def step():
            af_step_fn(state, x, y, rng)

        step()
        with counting(state.generator, state.discriminator, state.ema, state.opt_g, state.opt_d, x, y) as live:
            step()
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    workspace = CUBLAS_WORKSPACE + attention_scratch(batch, tokens, max(cfg.width, cfg.disc_width or 0))
    return Measure(live.peak, live.flops, workspace, outside_allocator(world))


def plan_af_train(exp: Experiment, world: int, cfg, train_cfg) -> Choice:
    """An adversarial flow trains on its whole per-rank share at once (no accumulation): checked, not chosen."""
    at = exp.params.af.train
    share = at.batch_size // world
    if at.batch_size % world:
        raise PlanError(f"run {exp.run!r}: af.train.batch_size {at.batch_size} does not split over {world} GPUs")
    budget = usable(exp.params.runtime.gpu_memory_gib)
    if budget is None:
        return Choice(exp.run, "train", share, False, 1, Measure(0, 0), at.steps)
    m = af_train_step(exp, world, share, cfg, train_cfg)
    if m.total > budget:
        raise PlanError(f"run {exp.run!r}: the adversarial flow's step does not fit in runtime.gpu_memory_gib "
                        f"{exp.params.runtime.gpu_memory_gib} GiB at its per-GPU batch {share} ({m.total / GIB:.1f} "
                        f"GiB needed); use more GPUs or a smaller af.train.batch_size")
    return Choice(exp.run, "train", share, False, 1, m, at.steps)


