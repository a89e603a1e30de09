"""What a GPU holds beyond the tensors the plan measures, and the share of its memory the plan may fill.

The measured peak (fake tensors, measure.py) is every tensor PyTorch allocates on the stage's code path. A real GPU
also holds, per process:
- inside PyTorch's caching allocator, but invisible to fake tensors (so counted by `max_memory_allocated`, not by
  the measurement): cuBLAS and cuBLASLt workspaces and the attention backward's fp32 accumulator;
- outside the allocator (not in `max_memory_allocated`, but in `nvidia-smi`): the CUDA context and NCCL's buffers.
These are added as documented allowances (numbers and sources below; bench/gpu_check.py measures them on a lent GPU).
The sum must stay under MARGIN of the GPU's memory: the rest is for the caching allocator's fragmentation (reserved
minus allocated memory), which no count predicts.
"""

from __future__ import annotations

MIB, GIB = 2**20, 2**30

# The plan fills at most this share of runtime.gpu_memory_gib (72 GiB of 80): the other 10 % is for the caching
# allocator's fragmentation (a few % of the peak in long runs) and what the allowances below miss.
MARGIN = 0.90

# cuBLAS (cublasSetWorkspace) and cuBLASLt workspaces: 32 MiB each on Hopper (PyTorch's CUDABlas.cpp default since
# pytorch#120925, after the cuBLAS guide's recommendation), one pair per thread that runs matmuls: the Python
# thread and autograd's device thread (backward).
CUBLAS_WORKSPACE = 2 * (32 + 32) * MIB

# The CUDA context of one process: 287 MB with lazy module loading (CUDA_MODULE_LOADING=LAZY, PyTorch's default
# since 1.13; pytorch#86509) against 667 MB eager, before kernels load; the kernels a training step loads lazily add
# to it. 1 GiB covers both; gpu_check's `cuda context` row measures it.
CUDA_CONTEXT = 1 * GIB

# NCCL's communicator buffers, on each GPU of a multi-GPU run: 544-688 MB per communicator on 4 A100s
# (NVIDIA/nccl#964), about 1.6 GB with NVLink SHARP (NVLS) on H100 nodes (NVIDIA/nccl#864); NCCL_NVLS_ENABLE=0
# lowers it. A one-GPU run initialises no NCCL.
NCCL_BUFFERS = 2 * GIB


def attention_scratch(batch: int, tokens: int, width: int) -> int:
    """The attention backward's fp32 accumulator for dQ (FlashAttention-2's `dq_accum`, 4 bytes x batch x tokens x
    width), allocated inside the kernel, so fake tensors never see it."""
    return 4 * batch * tokens * width


def outside_allocator(world: int) -> int:
    """CUDA context, plus NCCL's buffers when the stage runs on more than one GPU."""
    return CUDA_CONTEXT + (NCCL_BUFFERS if world > 1 else 0)


def usable(gpu_memory_gib: float | None) -> int | None:
    """Bytes the plan may fill on a GPU of `gpu_memory_gib` (None: no budget)."""
    return None if gpu_memory_gib is None else int(gpu_memory_gib * GIB * MARGIN)
