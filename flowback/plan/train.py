"""The training step's plan: micro-batch (gradient accumulation) and activation checkpointing for the budget.

Every byte one rank holds while it trains is on the path measured: the model, AdamW's state, the EMA, the alignment
encoder's weights and targets (cached for an in-memory set, computed per step for streamed data), the batch, the
previous step's gradients (freed only at the next zero_grad), DDP's gradient buffer (world > 1, plan/ddp.py), and
the step's last micro-batch, which runs while the gradients of the others are held (with DDP, a second set beside
its buffer). Per-family functions: `plan_flow_train` (TARFlow / STARFlow), `plan_af_train` (adversarial
flows).
"""

from __future__ import annotations

import torch

from ..params import Experiment
from .budget import CUBLAS_WORKSPACE, attention_scratch, outside_allocator, usable
from .ddp import BucketViews
from .measure import EFFICIENT_MICRO, GIB, Choice, Measure, PlanError, _divisors, _fake, _memo, counting


def alignment_encoder(exp: Experiment, device: torch.device):
    """The run's alignment encoder with random weights (same memory and FLOPs as the pretrained one; no download).
    Under fake tensors it is built on the meta device first (timm's initialisation reads values)."""
    import timm
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ..alignment.encoder import EncoderConfig, FrozenEncoder

    cfg = EncoderConfig.of(exp.params.encoder)
    if detect_fake_mode() is None:
        return FrozenEncoder(timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs), cfg).to(device)
    with unset_fake_temporarily(), torch.device("meta"):
        net = timm.create_model(cfg.arch, pretrained=False, **cfg.kwargs)
    for m in net.modules():  # fake tensors of the meta tensors' shapes
        for name, t in m._parameters.items():
            if t is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device=device))
        for name, t in m._buffers.items():
            if t is not None:
                m._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=device)
    enc = FrozenEncoder(net, cfg)
    enc.to = lambda *a, **k: enc  # fake modules must not be copied (AlignTargets moves it: it is there already)
    return enc


def in_memory_images(exp: Experiment) -> int | None:
    """Training images held in memory (their alignment targets are cached on the GPU), None when streamed: the
    digits are in memory, ImageNet is streamed (flowback/jobs/train.py)."""
    d = exp.params.data
    if d.dataset != "digits":
        return None
    return 1797 - round(1797 * d.val_fraction)


class TrainRig:
    """One rank of training.train on `device`: its state, encoder, targets, batch and step, built as the train stage
    builds them, so the plan (fake tensors) and bench/gpu_check.py (a GPU) count the same bytes. On 2+ GPUs the
    gradients are those of DDP (ddp.py's stand-in; real_ddp: DDP itself, in an initialised process group)."""

    def __init__(self, exp: Experiment, world: int, checkpointing: bool, device: torch.device,
                 real_ddp: bool = False):
        from torch._guards import detect_fake_mode

        from ..data.batches import Batch
        from ..alignment.objective import AlignTargets, Objective, align_spec
        from ..training import TrainState, checkpoint_layers

        p, tp = exp.params, exp.params.train
        self.exp, self.world, self.share = exp, world, tp.batch_size // world
        spec = align_spec(exp)
        encoder = alignment_encoder(exp, device) if spec else None
        self.state = st = TrainState(exp, encoder.dim if encoder else 0, device)
        if st.ema is not None and detect_fake_mode() is not None:
            # deepcopy (TrainState's EMA) gives a fake module its own fake mode: rebuild the EMA in this one
            st.ema = type(st.model)(st.model.cfg).requires_grad_(False)
        if checkpointing:
            checkpoint_layers(st.model)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tp.dtype == "bfloat16")
        cfg = st.model.cfg
        d, n_fixed = p.data, in_memory_images(exp)
        fixed = torch.zeros(n_fixed, d.channels, d.image_size, d.image_size, dtype=torch.uint8) if n_fixed else None
        self.targets = (AlignTargets(encoder, cfg.grid, device, self.autocast, fixed, p.align.target_grid)
                        if spec else None)
        del fixed  # the stage keeps the images on the host
        x = torch.randn(self.share, cfg.channels, cfg.image_size, cfg.image_size, device=device)
        y = torch.randint(0, cfg.num_classes, (self.share,), device=device)
        if n_fixed:
            self.batch = Batch(x, y, index=torch.arange(self.share, device=device))
        else:
            pixels = torch.zeros(self.share, d.channels, d.image_size, d.image_size, dtype=torch.uint8, device=device)
            self.batch = Batch(x, y, pixels=pixels)
        self.objective = Objective.of(exp, st.model, st.projectors)
        self.ddp = None
        if world > 1 and real_ddp:
            self.ddp = self.objective = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)  # as training.train wraps it
        elif world > 1:
            self.ddp = BucketViews(st.parameters())
        self.encoder_flops = 0
        if self.targets is not None and self.targets.cache is None:
            with counting() as live:
                self.targets(self.batch)
            self.encoder_flops = live.flops
        self._after_a_step()

    def _after_a_step(self) -> None:
        """AdamW's state and the previous step's gradients, as after a real step (no forward pass needed)."""
        params = self.state.parameters()
        if isinstance(self.ddp, BucketViews):
            self.ddp.assign()
        else:
            for q in params:
                q.grad = torch.zeros_like(q)
        self.state.optimizer.step()

    def resident(self) -> list:
        """What the rank holds between steps (gradients included, through the modules)."""
        st, t = self.state, self.targets
        return [st.model, st.projectors, st.optimizer, st.ema, self.batch.x, self.batch.y, self.batch.index,
                self.batch.pixels, t.encoder if t else None, t.cache if t else None,
                getattr(self.ddp, "bucket", None)]

    def step(self, micro: int, accumulation: int) -> None:
        """One optimizer step of training.train's loop: step inputs, targets, zero_grad, every micro-batch,
        clipping, AdamW, EMA (what bench/gpu_check.py times and measures)."""
        from ..training import StepPlan, accumulate_gradients

        x, y, tgt = self._inputs()
        self.state.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(self.objective, x, y, tgt, StepPlan(micro, accumulation), self.ddp, self.autocast)
        self._update()

    def hold_gradients(self, accumulation: int) -> None:
        """The gradients the step's last micro-batch starts with: alone, the previous step's (views of DDP's buffer
        on 2+ GPUs), freed at zero_grad; after k-1 others, those they accumulated, tensors of their own (DDP syncs
        only the last micro-batch, ddp.py)."""
        for q in self.state.parameters():
            q.grad = self.ddp.views[q] if self.ddp is not None and accumulation == 1 else torch.zeros_like(q)

    def last_micro_step(self, micro: int, accumulation: int) -> None:
        """The step from its last micro-batch on, after hold_gradients(accumulation): step inputs and targets, the
        last micro-batch (synchronised), clipping, AdamW, EMA. Micro-batches 2..k hold the same bytes and the first
        holds less (no gradients yet), so this is the step's peak; tests/test_plan.py checks it against
        MemTracker over a whole step of two micro-batches."""
        from ..training import StepPlan, accumulate_gradients

        x, y, tgt = self._inputs()
        if accumulation == 1:
            self.state.optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(self.objective, x, y, tgt, StepPlan(micro, 1), self.ddp, self.autocast)
        self._update()

    def _inputs(self):
        from ..training import step_inputs

        x, y = step_inputs(self.batch, 0, self.exp, 0, self.world)
        return x, y, self.targets(self.batch) if self.targets is not None else None

    def _update(self) -> None:
        tp, st = self.exp.params.train, self.state
        # foreach, as clip_grad_norm_ chooses for real tensors (fake ones fall back to a slow per-parameter loop)
        torch.nn.utils.clip_grad_norm_(st.parameters(), tp.grad_clip if tp.grad_clip > 0 else float("inf"),
                                       foreach=True)
        st.optimizer.step()
        st.update_ema(tp.ema_decay)


_RIGS: dict = {}


def _rig(exp: Experiment, world: int, checkpointing: bool):
    """(fake mode, rig): one per run and layout, reused for every micro-batch the plan tries (building it costs
    about a third of a measurement)."""
    key = (id(exp), world, checkpointing)
    if key not in _RIGS:
        mode = _fake()
        with mode:
            _RIGS[key] = (exp, mode, TrainRig(exp, world, checkpointing, torch.device("cpu")))  # exp: keeps id unique
    return _RIGS[key][1:]


@_memo("sample", "metrics", "af")
def flow_train_step(exp: Experiment, world: int, micro: int, checkpointing: bool) -> Measure:
    """One rank's optimizer step with `micro`-image micro-batches: the peak of its last micro-batch (TrainRig.
    last_micro_step); FLOPs are the whole step's (the encoder once, every micro-batch)."""
    share = exp.params.train.batch_size // world
    k = share // micro
    mode, rig = _rig(exp, world, checkpointing)
    with mode:
        rig.hold_gradients(k)
        with counting(*rig.resident()) as live:
            rig.last_micro_step(micro, k)
    flops = rig.encoder_flops + (live.flops - rig.encoder_flops) * k
    cfg = rig.state.model.cfg
    workspace = CUBLAS_WORKSPACE + attention_scratch(micro, cfg.num_tokens, cfg.width)
    return Measure(live.peak, flops, workspace, outside_allocator(world))


def plan_flow_train(exp: Experiment, world: int) -> Choice:
    """The micro-batch and checkpointing of a run's training step (as the params state, or chosen when `auto`)."""
    tp = exp.params.train
    budget = usable(exp.params.runtime.gpu_memory_gib)
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

    def step(m: int, ckpt: bool) -> Measure:
        return flow_train_step(exp, world, m, ckpt)

    def choice(m: int, ckpt: bool) -> Choice:
        return Choice(exp.run, "train", m, ckpt, share // m, step(m, ckpt), tp.steps)

    def largest(ckpt: bool) -> int | None:
        for m in reversed(cands):  # from the whole share down: the answer is usually among the largest two
            if step(m, ckpt).total <= budget:
                return m
        return None

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
    need = step(min(cands), ckpt).total
    raise PlanError(f"run {exp.run!r}: the training step does not fit in runtime.gpu_memory_gib "
                    f"{exp.params.runtime.gpu_memory_gib} GiB even at micro-batch {min(cands)}"
                    f"{' with activation checkpointing' if ckpt else ''} ({need / GIB:.1f} GiB needed); use more "
                    f"GPUs (a smaller per-GPU share), train.micro_batch/checkpointing: auto, or a smaller model")


def resolve_train_plan(exp: Experiment, world: int, device: torch.device):
    """The StepPlan the train stage runs with; checked against the budget whenever runtime.gpu_memory_gib is set."""
    from ..training import StepPlan

    c = plan_flow_train(exp, world)
    return StepPlan(c.value, c.accumulation, c.checkpointing)
