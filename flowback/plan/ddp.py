"""DDP's gradient memory without a process group: what the plan (fake tensors) and gpu_check (one GPU) count for a
multi-GPU training step.

training.train wraps the objective in DistributedDataParallel(gradient_as_bucket_view=True): when it is built DDP
allocates buckets (25 MiB each) that hold every parameter's gradient, resident for the whole run. In a synchronised
backward each gradient, as it is accumulated, is copied into its view of that buffer and the view replaces it. Under
`no_sync()` (every micro-batch but the last) DDP does nothing, so after zero_grad(set_to_none=True) the gradients
are tensors of their own: with gradient accumulation a rank holds two full sets of gradients (its own and the
buffer) from the first micro-batch to the last. tests/test_plan.py checks this stand-in against DDP itself.
"""

from __future__ import annotations

import contextlib

import torch


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class BucketViews:
    """Stands in for DDP(gradient_as_bucket_view=True) in accumulate_gradients (its `ddp` argument: `no_sync()`)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        params = [p for p in params if p.requires_grad]
        first = params[0]
        self.bucket = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        self.views: dict[torch.nn.Parameter, torch.Tensor] = {}
        offset = 0
        for p in params:  # as_strided: a slice's view_as takes milliseconds per parameter under fake tensors
            self.views[p] = self.bucket.as_strided(p.shape, _contiguous_strides(p.shape), offset)
            offset += p.numel()
            p.register_post_accumulate_grad_hook(self._ready)
        self.sync = True

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def _ready(self, p: torch.nn.Parameter) -> None:
        view = self.views[p]
        if self.sync and p.grad is not view:
            view.copy_(p.grad)
            p.grad = view

    def assign(self) -> None:
        """Every gradient a view of the buffer, as DDP leaves them after a synchronised step."""
        for p, view in self.views.items():
            p.grad = view
