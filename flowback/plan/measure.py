"""Counting what a stage allocates and computes, on its real code under fake tensors, and the helpers the
stages' plans choose with."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import FlowBackError
from ..params import Params

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


_MEMO: dict = {}


def _memo(fn):
    """Cache a measurement per (run config object, arguments): a plan measures each case once."""

    def wrapper(exp, *args):
        key = (fn.__name__, id(exp), args)
        if key not in _MEMO:
            _MEMO[key] = (exp, fn(exp, *args))  # keeps `exp` alive, so its id stays unique
        return _MEMO[key][1]

    return wrapper


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
