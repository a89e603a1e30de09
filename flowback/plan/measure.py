"""Counting what a stage allocates and computes, on its real code under fake tensors, and the helpers the
stages' plans choose with."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import FlowBackError
from ..params import Experiment
from .budget import GIB

EFFICIENT_MICRO = 8  # below this many images per micro-batch, checkpointing (about 1.33x compute) beats tiny matmuls
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM, the reference for GPU-hour estimates


class PlanError(FlowBackError):
    """A stage cannot fit in the GPU memory budget; the message names the run and what to change."""


# ---------------------------------------------------------------------------------------------------- measuring
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages: those of the `resident` objects (until they are freed, as the last
    step's gradients are at zero_grad) and those created while active; `peak` is the maximum.
    Also sums the FLOPs of every op torch's flop counter has a formula for (matmuls, convolutions, attention),
    without FlopCounterMode's module hooks, which do not support autograd.grad (denoising, the classifier).
    Causal attention is counted as executed: half of torch's full-attention formula, since the flash kernels skip
    the key blocks above the diagonal (the diagonal blocks they do compute, 1/16 more at 1024 tokens, are left out)."""

    def __init__(self, *resident):
        super().__init__()
        self.live = self.peak = 0
        self.flops = 0
        self._sizes: dict[int, int] = {}
        for st in storages(*resident):
            self._track(st)

    def _track(self, st: torch.UntypedStorage) -> None:
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
            flops = count(*args, **kwargs, out_val=out)
            self.flops += flops // 2 if _causal(func, args, kwargs) else flops
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out


def _causal(func, args, kwargs) -> bool:
    """An attention kernel called with is_causal=True (found by name in the op's schema: every SDPA backend)."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == "is_causal":
            return bool(kwargs["is_causal"] if "is_causal" in kwargs else args[i] if i < len(args) else a.default_value)
    return False


def storages(*objects) -> list[torch.UntypedStorage]:
    """The distinct storages of all tensors in modules (parameters, their gradients, buffers) / optimizers (state) /
    tensors / containers. Iterative: a recursive closure would be a reference cycle holding every storage it saw
    until the next garbage collection (measurements run with the collector off)."""
    seen: dict[int, torch.UntypedStorage] = {}
    todo = list(objects)
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            seen.setdefault(id(st), st)
        elif isinstance(x, torch.nn.Module):
            for t in list(x.parameters()) + list(x.buffers()):
                todo += [t, t.grad]  # gradients held from the previous step
        elif isinstance(x, torch.optim.Optimizer):
            todo += [v for state in x.state.values() for v in state.values()]
        elif isinstance(x, dict):
            todo += list(x.values())
        elif isinstance(x, (list, tuple)):
            todo += list(x)
    return list(seen.values())


def storage_bytes(*objects) -> int:
    """Bytes of the distinct storages of all tensors in `objects` (see `storages`)."""
    return sum(st.nbytes() for st in storages(*objects))


@dataclass(frozen=True)
class Measure:
    """A stage's per-GPU memory: `peak` is measured, the rest are budget.py's allowances."""

    peak: int  # bytes of tensors at the peak (the resident state included), measured under fake tensors
    flops: int  # of the measured work (train: one whole optimizer step of this rank)
    workspace: int = 0  # inside PyTorch's allocator but unseen by fake tensors: cuBLAS, attention scratch
    outside: int = 0  # outside the allocator: the CUDA context, NCCL's buffers

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated() should show for the same work."""
        return self.peak + self.workspace

    @property
    def total(self) -> int:
        """Everything the GPU holds for this process: what must fit."""
        return self.peak + self.workspace + self.outside


@contextlib.contextmanager
def counting(*resident) -> Iterator[LiveBytes]:
    """Count the bytes and FLOPs of what runs inside, on top of the `resident` objects' tensors. Python's cycle
    collector is off meanwhile: tensors in reference cycles count until the end, wherever a collection would have
    freed them, so a measurement does not depend on the process's history (a few hundred KiB on a tiny model)."""
    register_cpu_attention_flops()
    gc.collect()
    gc.disable()
    try:
        live = LiveBytes(*resident)
        with live:
            yield live
    finally:
        gc.enable()


def measure(fn: Callable[[], None], *resident) -> Measure:
    """Peak live bytes (the `resident` objects' tensors included) and FLOPs of `fn()`, run under fake tensors."""
    with counting(*resident) as live:
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


_MEMO: dict = {}
# never read by a measurement: runs that differ only here share one
_NOT_MEASURED = ("experiments", "results", "seed", "runtime", "train.seed", "train.steps", "train.milestones",
                 "train.log_every", "train.checkpoint_every", "train.warmup_steps", "train.lr", "train.min_lr")


def config_key(exp: Experiment, ignore: tuple[str, ...] = (), strategy: bool = True) -> str:
    """The run's settings a measurement can read, as text: two runs with the same key measure the same bytes."""
    d = exp.params.model_dump(mode="json")
    for name in _NOT_MEASURED + ignore:
        section, _, field = name.partition(".")
        if field and isinstance(d.get(section), dict):
            d[section].pop(field, None)
        elif not field:
            d.pop(section, None)
    if strategy:
        d["_run"] = [exp.family, exp.strategy, [list(p) for p in exp.positions]]
    return json.dumps(d, sort_keys=True)


def _memo(*ignore: str, strategy: bool = True):
    """Measure each distinct configuration once (runs and seeds that differ only in what the measurement does not
    read share it), with one progress line per measurement on stderr. `ignore`: params sections or
    section.fields the measurement does not read; strategy=False: it does not depend on the run's alignment."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(exp, *args):
            key = (fn.__name__, config_key(exp, ignore, strategy), args)
            if key not in _MEMO:
                t0 = time.perf_counter()
                _MEMO[key] = fn(exp, *args)
                m = _MEMO[key]
                size = f"{m.total / GIB:.1f} GiB, " if isinstance(m, Measure) else ""
                print(f"plan: {fn.__name__}{tuple(args)} of {exp.run}: {size}{time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            return _MEMO[key]

        return wrapper

    return deco


def inference_model(exp: Experiment):
    """The run's flow for inference (frozen), as sample and evaluate load it; usually built under fake tensors."""
    from ..builders import flow_config
    from ..models.tarflow import TARFlow

    return TARFlow(flow_config(exp.params)).eval().requires_grad_(False)


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
