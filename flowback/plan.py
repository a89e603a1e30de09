"""The memory plan: per-GPU peak memory of every stage, measured on the real code before any work.

Each number comes from running the stage's own code - the real model, the real training step (forward, alignment,
backward, clipping, AdamW), the real denoising and classifier passes - on fake tensors (torch's FakeTensorMode: shapes
and dtypes, no data, no GPU needed) while counting the bytes of every live tensor storage (`LiveBytes`). That makes
the plan exact for what PyTorch allocates; the caching allocator's fragmentation and the CUDA context are covered by
keeping the peak under `HEADROOM` of the budget (`runtime.gpu_memory_gib`). FLOPs are counted on the same pass
(with the formulas of torch's flop counter: matmuls, convolutions and attention).

The plan chooses, per run:
- train: the largest micro-batch (a divisor of the per-rank batch; the rest is gradient accumulation, so the global
  batch never changes) that fits without activation checkpointing, as long as it is at least `EFFICIENT_MICRO`
  images; otherwise per-layer checkpointing and the largest micro-batch that fits with it;
- sample: the largest micro-batch (chunk, chunk/2, ...) for the reverse pass and the denoising gradient;
- classifier: the largest batch for the training-free classifier's backward pass;
- encode (latent profiles): the VAE's encode batch is checked, not chosen.
A run that does not fit even at micro-batch 1 with checkpointing is an error naming the experiment.
`python -m flowback plan` prints the table; the stages call the same `resolve_*` functions when a value is `auto`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import FlowBackError
from .params import Experiment, Params

GIB = 2**30
HEADROOM = 0.95  # plan to this share of the GPU's memory: the rest covers allocator fragmentation and CUDA's context
EFFICIENT_MICRO = 8  # below this many images per micro-batch, checkpointing (about 1.33x compute) beats tiny matmuls
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM, the reference for GPU-hour estimates


class PlanError(FlowBackError):
    """A stage cannot fit in the GPU memory budget; the message names the run and what to change."""


# ---------------------------------------------------------------------------------------------------- measuring
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active and alive; `peak` is the maximum (plus `base`).
    Also sums the FLOPs of every op torch's flop counter has a formula for (matmuls, convolutions, attention),
    without FlopCounterMode's module hooks, which do not support autograd.grad (denoising, the classifier)."""

    def __init__(self, base: int = 0):
        super().__init__()
        self.live = self.peak = base
        self.flops = 0
        self._sizes: dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._sizes:
            return
        n = st.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def storage_bytes(*objects) -> int:
    """Bytes of the distinct storages of all tensors in modules / optimizers / tensors / containers."""
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if id(st) not in seen:
                seen.add(id(st))
                total += st.nbytes()
        elif isinstance(x, torch.nn.Module):
            for t in list(x.parameters()) + list(x.buffers()):
                visit(t)
        elif isinstance(x, torch.optim.Optimizer):
            for s in x.state.values():
                for v in s.values():
                    visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for o in objects:
        visit(o)
    return total


@dataclass(frozen=True)
class Measure:
    peak: int  # bytes
    flops: int  # of the measured call


def measure(fn: Callable[[], None], *resident) -> Measure:
    """Peak live bytes (the `resident` objects' tensors included) and FLOPs of `fn()`, run under fake tensors."""
    register_cpu_attention_flops()
    live = LiveBytes(storage_bytes(*resident))
    with live:
        fn()
    return Measure(live.peak, live.flops)


def register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels, not the CPU flash kernel SDPA takes on fake CPU tensors."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in flop_registry:
        register_flop_formula(fwd)(lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v))
    if bwd not in flop_registry:
        register_flop_formula(bwd)(lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _encoder_dim(exp: Experiment) -> int:
    """The alignment encoder's feature size, from its config (no weights needed)."""
    import timm

    e = exp.params.encoder
    with torch.device("meta"):  # the architecture only: never a weights download
        net = timm.create_model(e.arch, pretrained=False, **e.kwargs)
    return int(net.num_features)


# ---------------------------------------------------------------------------------------------------- the stages
_MEMO: dict = {}


def _memo(fn):
    """Cache a measurement per (run config object, arguments): a plan measures each case once."""

    def wrapper(exp, *args):
        key = (fn.__name__, id(exp), args)
        if key not in _MEMO:
            _MEMO[key] = (exp, fn(exp, *args))  # keeps `exp` alive, so its id stays unique
        return _MEMO[key][1]

    return wrapper


@_memo
def train_step(exp: Experiment, micro: int, checkpointing: bool) -> Measure:
    """One micro-batch of the real training step (after a first step, so AdamW's state exists), per GPU."""
    from .builders import align_spec
    from .training import Objective, TrainState, checkpoint_layers

    p = exp.params
    spec = align_spec(exp)
    enc_dim = _encoder_dim(exp) if spec else 0
    with _fake():
        state = TrainState(exp, enc_dim, torch.device("cpu"))
        if checkpointing:
            checkpoint_layers(state.model)
        obj = Objective(state.model, state.projectors, spec, p.align.weight if spec else 0.0, p.train.latent_norm_weight)
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


def _inference_model(exp: Experiment):
    from .builders import flow_config
    from .models.tarflow import TARFlow

    return TARFlow(flow_config(exp.params)).eval().requires_grad_(False)


@_memo
def denoise_pass(exp: Experiment, micro: int) -> Measure:
    """The denoising gradient step (fp32, as sampling runs it) on `micro` images, plus one KV-cached decoding step of
    the largest block (its caches allocated for every token, doubled with guidance)."""
    from .builders import guidance
    from .models.sampling import denoise

    sp = exp.params.sample
    with _fake():
        model = _inference_model(exp)
        cfg = model.cfg
        x = torch.randn(micro, cfg.channels, cfg.image_size, cfg.image_size)
        y = torch.randint(0, cfg.num_classes, (micro,))
        guided = guidance(sp.guidance).active
        blk = max(model.blocks, key=lambda b: len(b.layers))
        rows = 2 * micro if guided else micro
        autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=sp.dtype == "bfloat16")

        def work():
            caches = blk.new_caches(cfg.num_tokens)
            with torch.no_grad(), torch.autocast(**autocast):
                tok = torch.randn(rows, 1, cfg.token_dim)
                cond = torch.randn(rows, cfg.width)
                for i in range(2):
                    blk.step(tok, i, cond, caches)
            del caches
            if sp.denoise:
                denoise(model, x, y, exp.params.model.noise_std)

        return measure(work, model, x, y)


@_memo
def classifier_pass(exp: Experiment, batch: int) -> Measure:
    """One batch of the training-free classifier (a backward pass to the class logits)."""
    from .metrics.classifier import classify

    with _fake():
        model = _inference_model(exp)
        cfg = model.cfg
        x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
        return measure(lambda: classify(model, x), model, x)


def encode_pass(params: Params, batch: int) -> Measure:
    """One VAE encode batch of the latent profiles (image and flip: 2 x batch views)."""
    from .models.vae import LatentCodec, vae_from_config

    lp, d = params.model.latent, params.data
    with _fake():
        codec = LatentCodec(vae_from_config(lp.vae_dir), lp.scale, batch)
        x = torch.randn(2 * batch, 3, d.image_size, d.image_size)
        return measure(lambda: codec.encode_with_std(x), codec, x)


# ---------------------------------------------------------------------------------------------------- choosing
def _budget(params: Params) -> int | None:
    gib = params.runtime.gpu_memory_gib
    return None if gib is None else int(gib * GIB * HEADROOM)


def _largest(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest candidate that fits, by bisection (peak memory grows with the batch); None if none does."""
    cands = sorted(candidates)
    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(cands[mid]):
            best, lo = cands[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(math.ceil(out[-1] / 2))
    return out


@dataclass(frozen=True)
class Choice:
    run: str
    stage: str
    value: int  # images per micro-batch
    checkpointing: bool
    accumulation: int
    measure: Measure
    steps: int  # micro-batches per step (train) or batches in the whole stage
    note: str = ""


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


def plan_sample(exp: Experiment) -> Choice:
    sp = exp.params.sample
    budget = _budget(exp.params)
    chunk = sp.batch_size
    cands = _halvings(chunk) if sp.micro_batch in ("auto", None) else [sp.micro_batch]
    if sp.micro_batch is None:
        cands = [chunk]
    n = sp.per_class * exp.params.data.num_classes
    if budget is None:
        if sp.micro_batch == "auto":
            raise PlanError(f"run {exp.run!r}: sample.micro_batch auto needs runtime.gpu_memory_gib")
        return Choice(exp.run, "sample", min(cands), False, 1, Measure(0, 0), math.ceil(n / min(cands)))
    best = _largest(cands, lambda m: denoise_pass(exp, m).peak <= budget)
    if best is None:
        raise PlanError(f"run {exp.run!r}: sampling with denoising does not fit in runtime.gpu_memory_gib "
                        f"{exp.params.runtime.gpu_memory_gib} GiB even at micro-batch {min(cands)} "
                        f"({denoise_pass(exp, min(cands)).peak / GIB:.1f} GiB); set sample.micro_batch: auto")
    return Choice(exp.run, "sample", best, False, 1, denoise_pass(exp, best), math.ceil(n / best))


def plan_classifier(exp: Experiment, val_images: int) -> Choice:
    mp = exp.params.metrics
    budget = _budget(exp.params)
    cands = _halvings(256) if mp.classifier_batch_size == "auto" else [mp.classifier_batch_size]
    if budget is None:
        if mp.classifier_batch_size == "auto":
            raise PlanError(f"run {exp.run!r}: metrics.classifier_batch_size auto needs runtime.gpu_memory_gib")
        return Choice(exp.run, "classifier", cands[0], False, 1, Measure(0, 0), math.ceil(val_images / cands[0]))
    best = _largest(cands, lambda b: classifier_pass(exp, b).peak <= budget)
    if best is None:
        raise PlanError(f"run {exp.run!r}: the classifier does not fit in runtime.gpu_memory_gib "
                        f"{exp.params.runtime.gpu_memory_gib} GiB at batch {min(cands)} "
                        f"({classifier_pass(exp, min(cands)).peak / GIB:.1f} GiB); set metrics.classifier_batch_size: "
                        f"auto")
    return Choice(exp.run, "classifier", best, False, 1, classifier_pass(exp, best), math.ceil(val_images / best))


# ------------------------------------------------------------------------------------------ used by the stages
def resolve_train_plan(exp: Experiment, world: int, device: torch.device):
    """The StepPlan the train stage runs with; checked against the budget whenever runtime.gpu_memory_gib is set."""
    from .training import StepPlan

    c = plan_train(exp, world)
    return StepPlan(c.value, c.accumulation, c.checkpointing)


def resolve_sample_micro_batch(exp: Experiment, device: torch.device) -> int | None:
    sp = exp.params.sample
    if sp.micro_batch is None and exp.params.runtime.gpu_memory_gib is None:
        return None
    return plan_sample(exp).value


def resolve_classifier_batch(exp: Experiment, device: torch.device) -> int:
    mp = exp.params.metrics
    if mp.classifier_batch_size != "auto" and exp.params.runtime.gpu_memory_gib is None:
        return mp.classifier_batch_size
    return plan_classifier(exp, 0).value


# ------------------------------------------------------------------------------------------------------- the table
def world_size(launcher: str) -> int:
    """GPUs per run from the launcher (`torchrun --nnodes M --nproc_per_node N ...` -> M x N; python -> 1)."""
    import re

    n = re.search(r"--nproc[_-]per[_-]node[ =](\d+)", launcher)
    m = re.search(r"--nnodes[ =](\d+)(?::(\d+))?", launcher)
    return (int(n.group(1)) if n else 1) * (int(m.group(2) or m.group(1)) if m else 1)


@_memo
def forward_flops(exp: Experiment, batch: int) -> int:
    """FLOPs of one forward pass (what KV-cached decoding computes per image, token by token)."""
    with _fake():
        model = _inference_model(exp)
        cfg = model.cfg
        x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
        return measure(lambda: model(x), model, x).flops


def _val_images(params: Params) -> int:
    d = params.data
    if d.dataset == "digits":
        return round(1797 * d.val_fraction)
    return 50 * d.num_classes  # ImageNet's validation set: 50 images per class


def plan_rows(params: Params, world: int) -> list[tuple[Choice, float]]:
    """(choice, GPU-hours at MFU 1) for every run's train / sample / classifier, and the encode step if latent."""
    rows = []
    for run in params.runs():
        exp = params.run(run)
        t = plan_train(exp, world)
        rows.append((t, t.steps * t.measure.flops * t.accumulation * world / 1e12 / 3600))
        s = plan_sample(exp)
        n = exp.params.sample.per_class * exp.params.data.num_classes
        guided = 2 if exp.params.sample.guidance.method != "none" and exp.params.sample.guidance.weight > 0 else 1
        per_image = s.measure.flops / s.value + guided * forward_flops(exp, 1)
        rows.append((s, n * per_image / 1e12 / 3600))
        c = plan_classifier(exp, _val_images(params))
        rows.append((c, c.steps * c.measure.flops / 1e12 / 3600))
    if params.data.format == "latent" and params.model.latent is not None:
        m = encode_pass(params, params.data.encode_batch_size)
        rows.append((Choice("-", "encode", params.data.encode_batch_size, False, 1, m, 0), 0.0))
    return rows


def print_plan(path: str, gpu_mem: float | None = None, world: int | None = None, mfu: float = 0.4,
               peak_tflops: float = H100_BF16_TFLOPS, out=print) -> int:
    """`flowback plan`: the table, then `max peak: N GiB of M GiB`; exit 2 (via PlanError) if a run cannot fit."""
    from .params import load_params

    params = load_params(path)
    if gpu_mem is not None:
        params = params.model_copy(update={"runtime": params.runtime.model_copy(update={"gpu_memory_gib": gpu_mem})})
    if params.runtime.gpu_memory_gib is None:
        raise PlanError(f"{path}: no memory budget: pass --gpu-mem GiB or set runtime.gpu_memory_gib")
    world = world or world_size(params.runtime.launcher)
    budget = params.runtime.gpu_memory_gib
    out(f"{path}: memory plan for {world} GPU(s) per run with {budget:g} GiB each (peaks kept under "
        f"{HEADROOM:.0%}: {budget * HEADROOM:.1f} GiB), measured on the real code under fake tensors; GPU-hours at "
        f"MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s")
    out("")
    out("| run | stage | peak / GPU (GiB) | TFLOP per step | choice | GPU-hours |")
    out("|---|---|---|---|---|---|")
    rows = plan_rows(params, world)
    total = 0.0
    for c, tflop_hours in rows:
        hours = tflop_hours / (mfu * peak_tflops)
        total += hours
        if c.stage == "train":
            what = (f"micro-batch {c.value} x {c.accumulation} accumulation"
                    f"{', checkpointing' if c.checkpointing else ''}")
            per_step = c.measure.flops * c.accumulation * world / 1e12
        elif c.stage == "encode":
            what, per_step = f"VAE batch {c.value} (x2: image and flip)", c.measure.flops / 1e12
        else:
            what, per_step = f"batch {c.value}", c.measure.flops / 1e12
        note = " (a lower bound: KV-cached decoding runs far below training MFU)" if c.stage == "sample" else ""
        out(f"| {c.run} | {c.stage} | {c.measure.peak / GIB:.1f} | {per_step:.1f} | {what} | {hours:,.1f}{note} |")
    out("")
    out(f"grid total: {total:,.0f} GPU-hours at MFU {mfu:.0%}")
    peak = max(c.measure.peak for c, _ in rows) / GIB
    out(f"max peak: {peak:.1f} GiB of {budget:g} GiB")
    return 0
