"""R-REPA's reverse path: three gradient graphs (`reverse_grad`) over the same rebuilt values, each with a parallel
implementation and a sequential reference that runs the real token-by-token inverse.

Block t in its own token order, tokens i = 0..T-1: v is the block's output on the generative path (sg(z) for the
top block), c = sg(x^{t-1}) the cached block input, (a_i, b_i) the affine parameters the causal transformer computes
from tokens < i, and the Jacobi map J(u'; v)_i = v_i * exp(a_i(u'_<i)) + b_i(u'_<i). The inverse u* is the fixed
point u* = J(u*; v), and its value is c (invertibility). h = H_l(u) is the read: the residual stream after layer l.

- paper:  u = J(c; v); h = H_l(u). The context of (a, b) is the detached cache; the read differentiates through
          every rebuilt token. (FlowBack's pseudo-reverse; the first term of the exact gradient's Neumann series.)
- exact:  u = u*(v) with every dependence kept: the true derivative of the inverse map, h = H_l(u). By the implicit
          function theorem the cotangent g of u becomes w = g + (dJ/du)^T w; dJ/du is strictly lower-triangular
          over tokens, so iterating from w = g is exact after at most T sweeps (the Neumann series ends).
- newest: what a KV-cached inverse whose cache stores detached keys/values gives: everything computed at step i
          (the read h_i and the next token's (a, b)) differentiates through token i's own path only. In parallel:
          attention where token i sees the detached keys/values of tokens < i and its own, attached; the chain
          u_i -> u_{i+1} through that path is solved by the same adjoint iteration.

docs/reverse-gradient.md has the equations, the figure and the cost of each.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F



# ------------------------------------------------------------------------------------------------ shared pieces
def _read(blk, u_block_order: torch.Tensor, cond, layers: frozenset[int]) -> dict[int, torch.Tensor]:
    """Hidden states after `layers` of a block on block-order input, only running as deep as needed."""
    _, hidden = blk.transformer(u_block_order, cond, keep=layers, stop=max(layers))
    return hidden


def _jacobi(blk, u: torch.Tensor, v: torch.Tensor, cond) -> torch.Tensor:
    """J(u; v) = v * exp(a(u)) + b(u): one teacher-forced pass; equals u when u is the inverse of v."""
    a, shift, _ = blk.shifted_affine(u, cond)
    return v * torch.exp(a.float()).to(v.dtype) + shift


def _reverse_blocks(model, out, spec):
    """(block number, block) from the top (nearest z) down to the lowest aligned block: the generative order."""
    lowest = min(b for b, _ in spec.positions)
    return [(b, model.blocks[b - 1]) for b in range(len(model.blocks), lowest - 1, -1)]


# ------------------------------------------------------------------------------------------ paper: pseudo-reverse
def pseudo_reverse_features(model, out, conds, spec):
    """paper: (a, b) from one pass over each block's cached, detached input; u = v * exp(a) + b; read on u."""
    feats = {}
    v = out.z.detach()
    for b, blk in _reverse_blocks(model, out, spec):
        context = blk.permute(out.block_inputs[b - 1].detach())
        u = _jacobi(blk, context, blk.permute(v), conds[b - 1])  # equals `context` in value
        layers = spec.layers_at(b)
        if layers:
            feats.update({(b, l): h for l, h in _read(blk, u, conds[b - 1], layers).items()})
        v = blk.permute(u)
    return feats


# ------------------------------------------------------------------------------------ exact and newest: the adjoint
class _FixedPointInverse(torch.autograd.Function):
    """u = the fixed point of u = jmap(u, v, cond), whose value is already known (the cached block input).

    Forward returns that value without computing anything. Backward rebuilds jmap's graph at it once, solves the
    adjoint w = g + (d jmap/du)^T w (`_sweeps` or `_chain`), and returns w's vector-Jacobian product with
    d jmap/d(v, cond, params). Written by hand because torch has no implicit-function autograd.
    """

    @staticmethod
    def forward(ctx, jmap, context, solve, tol, sweeps, v, cond, *params):
        ctx.jmap, ctx.solve, ctx.tol, ctx.sweeps, ctx.params = jmap, solve, tol, sweeps, params
        ctx.has_cond = cond is not None
        ctx.save_for_backward(context, v, *([cond] if cond is not None else []))
        dev = context.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return context.clone()

    @staticmethod
    def backward(ctx, g):
        context, v, *rest = ctx.saved_tensors
        cond = rest[0] if ctx.has_cond else None
        dev, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            u = context.detach().requires_grad_(True)
            v = v.detach().requires_grad_(True)
            cond = cond.detach().requires_grad_(True) if cond is not None else None
            rebuilt = ctx.jmap(u, v, cond)
            w, passes = (_sweeps if ctx.solve == "sweeps" else _chain)(rebuilt, u, g, ctx.tol)
            wanted = [v] + ([cond] if cond is not None else []) + [p for p in ctx.params if p.requires_grad]
            grads = list(torch.autograd.grad(rebuilt, wanted, w, allow_unused=True))
        if ctx.sweeps is not None:
            ctx.sweeps.append(passes)
        gv = grads.pop(0)
        gcond = grads.pop(0) if cond is not None else None
        gparams = [grads.pop(0) if p.requires_grad else None for p in ctx.params]
        return (None, None, None, None, None, gv, gcond, *gparams)


def _vjp_u(rebuilt, u, cot):
    (back,) = torch.autograd.grad(rebuilt, u, cot, retain_graph=True, allow_unused=True)
    return torch.zeros_like(u) if back is None else back.to(cot.dtype)


def _sweeps(rebuilt, u, g, tol):
    """w = g + N^T w for a strictly lower-triangular N (every token may depend on every earlier one): sweeps from
    w = g, one parallel vector-Jacobian product each. Sweep k makes the last k tokens exact, so w stops changing
    after at most T sweeps (tol = 0 sweeps until it does; tol > 0 stops at that relative change)."""
    w, passes = g, 0
    for _ in range(u.shape[1] + 1):
        new = g + _vjp_u(rebuilt, u, w)
        passes += 1
        done = torch.equal(new, w) if tol == 0 else bool((new - w).norm() <= tol * new.norm())
        w = new
        if done:
            break
    return w, passes


def _chain(rebuilt, u, g, tol):
    """w = g + N^T w when token i+1 depends only on token i (newest): w_i = g_i + M_i^T w_{i+1}, M_i = dJ_{i+1}/du_i.

    One vector-Jacobian product per token dimension D gives every M_i at once (cotangent e_d on every token: row d
    of each M_i, since each output depends on one input); the recurrence is then solved exactly by doubling,
    ceil(log2 T) rounds of batched D x D products. D backward passes instead of up to T sweeps."""
    B, T, D = u.shape
    eye = torch.eye(D, dtype=g.dtype, device=g.device)
    rows = [_vjp_u(rebuilt, u, eye[d].expand(B, T, D).contiguous()) for d in range(D)]
    P = torch.stack(rows, dim=-1)  # P[:, i, :, d] = row d of M_i, so P[:, i] = M_i^T (B, T, D, D)
    s = g
    step = 1
    while step < T:  # invariant: s_i sums the first `step` terms of w_i's series, P_i multiplies `step` factors
        s_ahead = torch.cat([s[:, step:], torch.zeros_like(s[:, :step])], dim=1)
        P_ahead = torch.cat([P[:, step:], torch.zeros_like(P[:, :step])], dim=1)
        s = s + (P @ s_ahead.unsqueeze(-1)).squeeze(-1)
        P = P @ P_ahead
        step *= 2
    return s, D


def fixed_point_inverse(jmap: Callable, context: torch.Tensor, v: torch.Tensor, cond: torch.Tensor | None,
                        params: list[torch.Tensor], solve: str = "sweeps", tol: float = 0.0,
                        sweeps: list[int] | None = None) -> torch.Tensor:
    """The inverse u* of v (value: `context`) with the exact implicit gradient of u* = jmap(u*, v, cond).

    solve: "sweeps" for any autoregressive jmap, "chain" when token i+1 depends only on token i. tol = 0: exact;
    tol > 0 lets sweeps stop at that relative change. `sweeps`, if given, gets each backward's count of adjoint
    passes (vector-Jacobian products with respect to u; the parameters' gradients take one more) appended.
    """
    return _FixedPointInverse.apply(jmap, context, solve, tol, sweeps, v, cond, *params)


def exact_reverse_features(model, out, conds, spec, sweeps: list[int] | None = None):
    """exact: the inverse from sg(z) with every dependence kept (implicit gradient); read as in paper."""
    feats = {}
    v = out.z.detach()
    for b, blk in _reverse_blocks(model, out, spec):
        cond = conds[b - 1]
        context = blk.permute(out.block_inputs[b - 1].detach())
        u = fixed_point_inverse(lambda u_, v_, c_, blk=blk: _jacobi(blk, u_, v_, c_), context, blk.permute(v), cond,
                                list(blk.parameters()), "sweeps", spec.reverse_tol, sweeps)
        layers = spec.layers_at(b)
        if layers:
            feats.update({(b, l): h for l, h in _read(blk, u, cond, layers).items()})
        v = blk.permute(u)
    return feats


# --------------------------------------------------------------------------- newest: attention with a detached cache
def _qkv(attn, x: torch.Tensor):
    """(q, k, v), each (B, heads, T, head_dim), as the block's Attention computes them."""
    B, T, C = x.shape
    h = attn.norm(x.float()).to(x.dtype)
    return attn.qkv(h).view(B, T, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)


def _newest_attention(attn, x: torch.Tensor, kv_context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention output where token i attends to the (detached) cached keys/values of tokens < i and to its own
    key/value, which keeps its gradient: one attention over 2T keys with a mask."""
    B, T, C = x.shape
    q, k, v = _qkv(attn, x)
    kc, vc = kv_context
    i = torch.arange(T, device=x.device)
    mask = torch.cat([i[None, :] < i[:, None], i[None, :] == i[:, None]], dim=1)  # (T, 2T): earlier cached | own
    out = F.scaled_dot_product_attention(q, torch.cat([kc.to(k.dtype), k], 2), torch.cat([vc.to(v.dtype), v], 2),
                                         attn_mask=mask)
    return attn.proj(out.transpose(1, 2).reshape(B, T, C))


@torch.no_grad()
def _context_kv(blk, context: torch.Tensor, cond) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys/values on the cached block input, without gradient: the detached KV cache."""
    inputs = []
    handles = [layer.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in blk.layers]
    try:
        blk.transformer(context, cond.detach() if cond is not None else None)
    finally:
        for h in handles:
            h.remove()
    return [tuple(_qkv(layer.attn, x)[1:]) for layer, x in zip(blk.layers, inputs)]


@contextmanager
def _detached_cache_attention(blk, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """Inside, every attention of `blk` attends as a KV-cached step with a detached cache would (forward hooks that
    replace each attention's output; the block's own embedding, MLPs and affine output are used unchanged)."""
    handles = [layer.attn.register_forward_hook(lambda m, args, out, kv=kv_l: _newest_attention(m, args[0], kv))
               for layer, kv_l in zip(blk.layers, kv)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def newest_reverse_features(model, out, conds, spec, sweeps: list[int] | None = None):
    """newest: the graph of a KV-cached inverse with a detached cache, computed in parallel."""
    feats = {}
    v = out.z.detach()
    for b, blk in _reverse_blocks(model, out, spec):
        cond = conds[b - 1]
        context = blk.permute(out.block_inputs[b - 1].detach())
        kv = _context_kv(blk, context, cond)

        def jmap(u_, v_, c_, blk=blk, kv=kv):
            with _detached_cache_attention(blk, kv):
                return _jacobi(blk, u_, v_, c_)

        u = fixed_point_inverse(jmap, context, blk.permute(v), cond, list(blk.parameters()), "chain", sweeps=sweeps)
        layers = spec.layers_at(b)
        if layers:
            with _detached_cache_attention(blk, kv):
                feats.update({(b, l): h for l, h in _read(blk, u, cond, layers).items()})
        v = blk.permute(u)
    return feats


# ------------------------------------------------------------------------------ the references: the real inverse
class DetachedKVCache:
    """A differentiable KV cache that stores keys/values detached: the newest token's own key/value keep their
    gradient for the step that adds them, and lose it once cached. Duck-types models.transformer.KVCache."""

    def __init__(self, max_len: int):
        self.max_len, self.length, self._k, self._v = max_len, 0, [], []

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length + k.shape[2] > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length + k.shape[2]} > {self.max_len} tokens")
        keys, values = torch.cat(self._k + [k], dim=2), torch.cat(self._v + [v], dim=2)
        self._k.append(k.detach())
        self._v.append(v.detach())
        self.length += k.shape[2]
        return keys, values


@contextmanager
def _record_layers(blk, layers: frozenset[int], sink: dict[int, list[torch.Tensor]], on: list[bool]):
    """Forward hooks that append the output of each layer in `layers` (1-indexed) to sink[l] while on[0] is True,
    without the class-token position (cond_token: it leads the first step's chunk, never a token's own)."""
    def hook(l):
        def fn(module, args, output):
            if on[0]:
                sink[l].append(output[:, -1:])
        return fn

    handles = [blk.layers[l - 1].register_forward_hook(hook(l)) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def naive_reverse_features(model, out, conds, spec):
    """Reference for every `spec.reverse_grad`: the real token-by-token inverse from sg(z), KV-cached, with the
    variant's detach rule; features are the layer outputs recorded by forward hooks during that inverse.

    - paper:  two streams per step, equal in value: (a, b) from the step on the detached token with its own cache
              (the stop-gradient context); the recorded read from the step on the attached token (every rebuilt
              token keeps its gradient through the cache).
    - exact:  one stream, nothing detached: the recorded read and (a, b) come from the same step.
    - newest: one stream whose cache stores detached keys/values (DetachedKVCache).
    """
    grad = spec.reverse_grad
    feats = {}
    v = out.z.detach()
    for b, blk in _reverse_blocks(model, out, spec):
        cond = conds[b - 1]
        vb = blk.permute(v)
        T = vb.shape[1]
        layers = spec.layers_at(b)
        sink = {l: [] for l in layers}
        on = [False]
        if grad == "newest":
            caches = [DetachedKVCache(T) for _ in blk.layers]
        else:
            caches = blk.new_caches(T, differentiable=True)
        read_caches = blk.new_caches(T, differentiable=True) if grad == "paper" and layers else None
        tokens = [vb[:, :1]]
        with _record_layers(blk, layers, sink, on):
            for i in range(T):
                ui = tokens[i]
                if grad == "paper":
                    if read_caches is not None:
                        on[0] = True
                        blk.step(ui, i, cond, read_caches)
                        on[0] = False
                    a, shift = blk.step(ui.detach(), i, cond, caches)
                else:
                    on[0] = True
                    a, shift = blk.step(ui, i, cond, caches)
                    on[0] = False
                if i + 1 < T:
                    tokens.append(vb[:, i + 1 : i + 2] * torch.exp(a.float()).to(vb.dtype) + shift)
        for l in layers:
            feats[(b, l)] = blk.permute(torch.cat(sink[l], dim=1))
        v = blk.permute(torch.cat(tokens, dim=1))
    return feats


PARALLEL = {"paper": pseudo_reverse_features, "exact": exact_reverse_features, "newest": newest_reverse_features}
