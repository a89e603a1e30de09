"""Parallel inversion of an autoregressive affine block: Jacobi fixed-point iteration and GS-Jacobi.

Inverting a block solves the triangular system u_j = v_j * sigma_j(u_<j) + mu_j(u_<j), j = 0..T-1. The sequential
solver makes one transformer call per token (T calls). Jacobi iteration updates every token at once from the
previous iterate, u^{k+1} = v * sigma(u^k) + mu(u^k): one parallel pass per iteration. By causality token j is exact
after j + 1 passes whatever the first iterate, so T passes are exact, and a block whose tokens depend weakly on their
context reaches the tolerance in far fewer. A pass stops the iteration when max |u^{k+1} - u^k| < tol.

GS-Jacobi (Liu & Qin 2025, arXiv 2505.12849) refinements, all options of `Solver`:
- segments (their "modular Gauss-Seidel"): a block's tokens are split into equal segments solved in order, each by
  Jacobi iteration against the KV cache of the finished ones; a segment of S tokens is exact after S passes.
- init (chosen per block by their Initial Guessing Metric, `block_metrics`): the first iterate, "noise" (u^0 = v)
  or "zeros".
- per-block settings (chosen by their Convergence Ranking Metric): blocks whose CRM dominates are "tough" and get
  segments and a larger iteration cap, the rest plain Jacobi with a small cap (`gs_plan`).
One refinement of ours, `window`: a sliding window instead of fixed segments. Each pass updates the next `window`
tokens against the cached, committed ones, then commits the leading run that has converged and slides on, so no pass
recomputes a finished token and the window moves as fast as the tokens converge.
A segment still moving after max_iters passes, or whose iterate stops being finite, is finished by the KV-cached
sequential solver from its first inexact token, with a JacobiFallbackWarning and a count in the stats: results are
always those of the sequential solver, to the tolerance. Guidance runs the conditional and unconditional passes as
one batch of 2B, with per-token weights equal to the sequential steps'.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .guidance import Guidance
from .tarflow import FlowBlock, TARFlow

from .choices import JACOBI_INITS as INITS, SOLVERS  # noqa: E402


class JacobiFallbackWarning(UserWarning):
    """A Jacobi segment did not converge in its iteration cap and was finished by the sequential solver."""


def _per_block(value, cast):
    """An int/str for every block, or a tuple/list with one entry per block (forward order)."""
    return tuple(cast(v) for v in value) if isinstance(value, (tuple, list)) else cast(value)


@dataclass(frozen=True)
class Solver:
    """How to invert the blocks. Per-block fields take one value or a tuple with one per block, forward order.

    max_iters caps the passes of one segment (of a whole block for "jacobi"); with a window, the passes one token may
    spend in the window. A cap at or above the segment length never falls back: S passes solve S tokens exactly.
    """

    method: str = "sequential"  # sequential | jacobi | gs_jacobi
    tol: float = 1e-5  # a segment has converged when no token moved by more than this in a pass
    max_iters: int | tuple[int, ...] = 64  # passes per segment before the sequential fallback
    segments: int | tuple[int, ...] = 1  # Gauss-Seidel segments per block (gs_jacobi)
    init: str | tuple[str, ...] = "noise"  # first iterate: noise (u = v) | zeros
    window: int | tuple[int, ...] = 0  # gs_jacobi: > 0 = sliding window of this many tokens instead of segments

    @classmethod
    def of(cls, s) -> "Solver":
        """The block inversion a params `sample` section (solver, jacobi) describes."""
        jp = s.jacobi
        tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        return cls(s.solver, jp.tol, tup(jp.max_iters), tup(jp.segments) if s.solver == "gs_jacobi" else 1,
                   tup(jp.init), tup(jp.window) if s.solver == "gs_jacobi" else 0)

    def __post_init__(self):
        if self.method not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.method!r}")
        if not self.tol > 0:
            raise ValueError(f"jacobi tol must be > 0, got {self.tol}")
        object.__setattr__(self, "max_iters", _per_block(self.max_iters, int))
        object.__setattr__(self, "segments", _per_block(self.segments, int))
        object.__setattr__(self, "init", _per_block(self.init, str))
        object.__setattr__(self, "window", _per_block(self.window, int))
        if min(self.window if isinstance(self.window, tuple) else (self.window,)) < 0:
            raise ValueError(f"jacobi window must be >= 0 (0 = off), got {self.window}")
        for name in ("max_iters", "segments"):
            vals = getattr(self, name)
            if min(vals if isinstance(vals, tuple) else (vals,)) < 1:
                raise ValueError(f"jacobi {name} must be >= 1, got {vals}")
        inits = self.init if isinstance(self.init, tuple) else (self.init,)
        if any(i not in INITS for i in inits):
            raise ValueError(f"jacobi init must be one of {INITS}, got {self.init}")
        if self.method == "jacobi" and (self.segments != 1 or self.window != 0):
            raise ValueError("solver 'jacobi' iterates whole blocks: segments must be 1 and window 0 (gs_jacobi has "
                             "those)")

    def block(self, t: int, num_blocks: int) -> dict[str, Any]:
        """jacobi_block's settings for block t (1-based, forward order): segments, max_iters, init, window, tol."""
        out = {"tol": self.tol}
        for name in ("segments", "max_iters", "init", "window"):
            vals = getattr(self, name)
            if isinstance(vals, tuple):
                if len(vals) != num_blocks:
                    raise ValueError(f"jacobi {name} has {len(vals)} entries for a flow of {num_blocks} blocks")
                vals = vals[t - 1]
            out[name] = vals
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def segment_bounds(num_tokens: int, segments: int) -> list[tuple[int, int]]:
    """Token ranges [j0, j1) of `segments` near-equal consecutive segments."""
    segments = max(1, min(segments, num_tokens))
    cuts = [num_tokens * i // segments for i in range(segments + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@torch.no_grad()
def jacobi_block(
    blk: FlowBlock,
    v: torch.Tensor,
    cond: torch.Tensor | None,
    uncond: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    segments: int = 1,
    max_iters: int = 64,
    init: str = "noise",
    tol: float = 1e-5,
    window: int = 0,
    stats=None,
    block: int = 0,
) -> torch.Tensor:
    """Invert one block by (GS-)Jacobi iteration: v (B, T, D) in spatial order -> u in spatial order.

    segments > 1: fixed Gauss-Seidel segments, max_iters passes each. window > 0: a sliding window of that many
    tokens instead (see `Solver`); a token may stay max_iters passes in it. stats, if given, gets
    `record_block(block, passes=..., fallbacks=..., sequential_steps=...)`."""
    guided = guidance is not None and uncond is not None and cond is not None
    v = blk.permute(v).float()
    B, T, _ = v.shape
    c = torch.cat([cond, uncond]) if guided else cond
    temp = guidance.temperature(B, guided, v.device) if guidance is not None else None
    w = guidance.token_weights(T, v.device) if guided else None
    u = v.clone() if init == "noise" else torch.zeros_like(v)
    caches = blk.new_caches(T) if window > 0 or segments > 1 else None
    lead = int(blk.cond_token and c is not None)  # the class token's cache position
    count = {"passes": 0, "fallbacks": 0, "sequential_steps": 0}

    def update(j0: int, j1: int) -> torch.Tensor:
        """Tokens j0..j1-1 from the current iterate and the caches' context (which take this range's inputs)."""
        x = torch.cat([u, u]) if guided else u
        a, b = blk.token_params(x, j0, j1, c, caches, temp)
        if guided:
            (a_c, a_u), (b_c, b_u) = a.chunk(2), b.chunk(2)
            a, b = guidance.combine(a_c, b_c, a_u, b_u, w[:, j0:j1])
        return blk.affine_inverse(v[:, j0:j1], a, b)

    def cut(j: int) -> None:
        """Keep in the caches only the context of the tokens before j."""
        keep = 0 if j == 0 else lead + (j if blk.sos is not None else j - 1)
        for cache in caches:
            cache.truncate(keep)

    def finish(j0: int, exact: int, j1: int, why: str) -> None:
        """The sequential solver for tokens exact..j1-1 (tokens j0..exact-1 are final, the caches hold the context
        of the tokens before j0)."""
        nonlocal caches
        count["fallbacks"] += 1
        warnings.warn(f"block {block}: Jacobi on tokens {j0}..{j1 - 1} {why}; finishing tokens {exact}..{j1 - 1} "
                      f"with the sequential solver", JacobiFallbackWarning, stacklevel=4)
        if caches is None:
            caches = blk.new_caches(T)
        cut(j0)
        if exact > j0:
            blk.token_params(torch.cat([u, u]) if guided else u, j0, exact, c, caches, temp)
        for j in range(exact, j1):
            u[:, j : j + 1] = update(j, j + 1)
            count["sequential_steps"] += 1

    if window > 0:
        _sliding(T, window, max_iters, tol, u, update, cut, finish, count)
    else:
        for j0, j1 in segment_bounds(T, segments):
            _segment(j0, j1, max_iters, tol, u, update, cut if caches is not None else None, finish, count)
    if stats is not None:
        stats.record_block(block, **count)
    return blk.permute(u)


def _segment(j0, j1, max_iters, tol, u, update, cut, finish, count) -> None:
    """Jacobi passes over tokens j0..j1-1 until no token moves by tol (or all are exact: j1 - j0 passes)."""
    change = float("inf")
    for k in range(1, min(max_iters, j1 - j0) + 1):
        new = update(j0, j1)
        count["passes"] += 1
        change = (new - u[:, j0:j1]).abs().max().item()
        if not math.isfinite(change):  # a diverging iterate: keep only what causality says is exact
            u[:, j0 : j0 + k] = new[:, :k]
            return finish(j0, j0 + k, j1, f"stopped being finite after {k} passes")
        u[:, j0:j1] = new
        if change < tol or k == j1 - j0:
            return
        if cut is not None:
            cut(j0)
    finish(j0, j0 + k, j1, f"did not converge in {k} passes (last change {change:.3g}, tol {tol:g})")


def _sliding(T, window, max_iters, tol, u, update, cut, finish, count) -> None:
    """Sliding-window Jacobi: each pass updates tokens f..f+window-1 against the cached context of tokens < f, then
    commits the longest leading run that has converged (moved by < tol since its previous update; the first token
    of the window is exact) and moves the window past it."""
    f = 0
    age = torch.zeros(T, dtype=torch.long)
    while f < T:
        e = min(f + window, T)
        new = update(f, e)
        count["passes"] += 1
        moved = (new - u[:, f:e]).abs().amax(dim=(0, 2))
        if not torch.isfinite(moved).all():
            return finish(f, f, T, "stopped being finite")
        u[:, f:e] = new
        age[f:e] += 1
        done = (moved < tol) & (age[f:e] >= 2)
        done[0] = True
        n = int(done.long().cumprod(0).sum())
        if n < e - f and int(age[f + n]) >= max_iters:
            cut(f + n)
            return finish(f + n, f + n, T, f"did not converge: token {f + n} still moving after {max_iters} passes")
        cut(f + n)
        f += n


# -- GS-Jacobi's block metrics and plan ------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockMetrics:
    block: int  # forward order, 1-based
    crm: float  # Convergence Ranking Metric: large = many Jacobi passes
    igm: dict[str, float]  # Initial Guessing Metric per init: RMS error of the first pass from it (smaller is better)

    @property
    def best_init(self) -> str:
        return min(INITS, key=lambda k: self.igm[k])


@torch.no_grad()
def block_metrics(model: TARFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> list[BlockMetrics]:
    """GS-Jacobi's per-block metrics from real data x (B, C, H, W) (a small batch of training images).

    CRM = ||mean_batch(u / sigma)||_2 * ||W_a||_2 + ||W_b||_2 (u the block input, W_a, W_b the halves of the output
    projection; spectral norms), the paper's bound on how strongly a block's tokens depend on their context.
    IGM: for each init, one Jacobi pass from it towards the block's true input; the RMS error that remains (the paper
    takes the 2-norm of the batch-mean residual instead, where errors of opposite sign cancel).
    """
    model.eval()
    out = model(x, y, keep_inputs=True)
    conds = model.conditions(y, None, x.shape[0])
    outputs = out.block_inputs[1:] + [out.z]
    res = []
    for t, blk in enumerate(model.blocks, 1):
        u, v = blk.permute(out.block_inputs[t - 1]).float(), blk.permute(outputs[t - 1]).float()
        a, _, _ = blk.shifted_affine(u, conds[t - 1])
        w_a, w_b = blk.proj_out.weight.float().chunk(2, dim=0)
        spec = lambda m: torch.linalg.matrix_norm(m, ord=2).item()  # noqa: E731
        crm = spec((u * torch.exp(-a.float())).mean(dim=0)) * spec(w_a) + spec(w_b)
        igm = {}
        for init in INITS:
            u0 = v.clone() if init == "noise" else torch.zeros_like(v)
            a0, b0, _ = blk.shifted_affine(u0, conds[t - 1])
            igm[init] = (blk.affine_inverse(v, a0, b0) - u).pow(2).mean().sqrt().item()
        res.append(BlockMetrics(t, crm, igm))
    return res


def gs_plan(metrics: list[BlockMetrics], tol: float = 1e-5, max_iters: int = 16, tough_ratio: float = 3.0,
            tough_segments: int = 8, tough_max_iters: int = 64, use_igm: bool = True) -> Solver:
    """A gs_jacobi Solver from block metrics: blocks with CRM >= tough_ratio x the median CRM are tough (segments,
    larger cap), the rest one segment with a small cap; init per block by the IGM (else noise)."""
    crm = torch.tensor([m.crm for m in metrics])
    tough = (crm >= tough_ratio * crm.median()).tolist()
    return Solver(
        method="gs_jacobi",
        tol=tol,
        segments=tuple(tough_segments if t else 1 for t in tough),
        max_iters=tuple(tough_max_iters if t else max_iters for t in tough),
        init=tuple(m.best_init if use_igm else "noise" for m in metrics),
    )
