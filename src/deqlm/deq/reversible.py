"""The reversible DEQ gradient: exact backpropagation through the reversible iteration, states rebuilt
in backward instead of stored (McCallum, Arora, Foster 2025; the forward iteration is
`deqlm.solvers.reversible`).

With a = 1 - beta, step n maps (y, z) to y_n = a y + beta f(z), z_n = a z + beta f(y_n). Walking back from
the last step with the incoming gradients gz = dL/dz_n and gy = dL/dy_n (zero at the end: y is not an output):

    f(y_n), graph;  z = (z_n - beta f(y_n)) / a;  gy += beta gz J_f(y_n);      dtheta += beta gz df(y_n)
    f(z), graph;    y = (y_n - beta f(z)) / a;    gz = a gz + beta gy J_f(z);  dtheta += beta gy df(z)
                                                  gy = a gy

so one step back costs two evaluations of f with a graph and two vector-Jacobian products, and holds one
graph at a time: the memory of a training step does not depend on the number of steps. The gradient is the
true gradient of the iteration that ran (up to the rounding the rebuilt states carry), not the IFT's
approximation at an inexact fixed point.

f runs again in backward, after the forward's `parametrize.cached()` has closed, so the backward reopens a
cache holding the forward's own tensors: the weight-normed weights, and DropConnect's sampled weights, are
the ones the forward iteration used (recomputing them would give a different f, or a fresh DropConnect mask).

Parameters of f are reached because f is called as `f(z, ctx)` with its context passed explicitly. In the
backward pass each differentiable tensor of ctx is replaced by a detached leaf, so the per-step
vector-Jacobian products stop there (and at `weights`, the tensors f reads that are not in ctx); their sums
are handed to autograd once, at the end, which carries them on through whatever built ctx (the injection, the
embedding). Without the cut, a ctx tensor computed from another (the injection from the input) would receive
its share twice.
"""

# B: batch, F: flattened state size per sample (_SF: (B, F) rows in the state dtype)

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrize

from deqlm.solvers.reversible import reversible_run


@dataclass
class ReversibleCall:
    """What one reversible layer call needs in forward and backward (held by the autograd node)."""

    f: Callable  # f(z, ctx) -> z
    ctx: dict  # f's context, with the tensors autograd should reach
    z0: torch.Tensor
    max_iter: int
    tol: float
    stop_mode: str
    options: Mapping[str, Any]  # the reversible solver's own keywords (beta, state_dtype)
    stats: dict  # the layer's stats, filled in forward and completed in backward


def _cache_snapshot() -> dict | None:
    """The parametrization tensors cached right now (None outside `parametrize.cached()`)."""
    return dict(parametrize._cache) if parametrize._cache_enabled else None


@contextlib.contextmanager
def _replayed_cache(snapshot: dict | None) -> Iterator[None]:
    """Reopen a parametrization cache holding the forward's tensors (nothing to do without one)."""
    if snapshot is None:
        yield
        return
    with parametrize.cached():
        parametrize._cache.update(snapshot)
        yield


class _ReversibleFunction(torch.autograd.Function):
    """z_N of the reversible iteration; backward rebuilds the states and returns the gradients of the
    differentiable ctx tensors and of `weights` (in the order `ReversibleCall` lists them)."""

    @staticmethod
    def forward(fctx, call: ReversibleCall, ctx_keys: list[str], *tensors: torch.Tensor):
        run = reversible_run(
            lambda z: call.f(z, call.ctx), call.z0, max_iter=call.max_iter, tol=call.tol,
            stop_mode=call.stop_mode, **call.options,
        )
        res = run.result
        call.stats.update(
            f_nstep=float(res.nstep), f_evals=float(res.f_evals), f_abs_res=res.abs_res,
            f_rel_res=res.rel_res, converged_frac=res.converged_frac,
        )
        device = call.z0.device.type
        fctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        fctx.cache = _cache_snapshot()
        fctx.call, fctx.ctx_keys, fctx.nstep, fctx.beta = call, ctx_keys, res.nstep, run.beta
        fctx.save_for_backward(run.z_SF, run.y_SF, *tensors[len(ctx_keys):])
        return res.z

    @staticmethod
    def backward(fctx, grad_z: torch.Tensor):
        z_SF, y_SF, *weights = fctx.saved_tensors
        call: ReversibleCall = fctx.call
        enabled, amp_dtype, device = fctx.autocast
        replay = _replayed_cache(fctx.cache)
        with torch.enable_grad(), torch.autocast(device, dtype=amp_dtype, enabled=enabled), replay:
            grads, recon = reverse(call, fctx.ctx_keys, weights, z_SF, y_SF, grad_z, fctx.nstep, fctx.beta)
        call.stats.update(b_nstep=float(fctx.nstep), rev_recon_err=recon)
        return (None, None, *grads)


def reverse(
    call: ReversibleCall,
    ctx_keys: list[str],
    weights: Sequence[torch.Tensor],
    z_SF: torch.Tensor,
    y_SF: torch.Tensor,
    grad_z: torch.Tensor,
    nstep: int,
    beta: float,
) -> tuple[list[torch.Tensor | None], float]:
    """The walk back (module docstring): gradients of the ctx tensors `ctx_keys` then of `weights`, and the
    reconstruction error ||rebuilt z0 - z0|| / ||z_N|| (the worst of both states)."""
    ctx_cut = {**call.ctx, **{k: call.ctx[k].detach().requires_grad_() for k in ctx_keys}}
    leaves = [ctx_cut[k] for k in ctx_keys] + list(weights)
    acc: list[torch.Tensor | None] = [None] * len(leaves)
    b, a = beta, 1.0 - beta
    sdt = z_SF.dtype
    shape, in_dtype = call.z0.shape, call.z0.dtype
    z_end_norm = float(torch.linalg.vector_norm(z_SF))
    gz_SF = grad_z.reshape(z_SF.shape).to(sdt)
    gy_SF = torch.zeros_like(y_SF)

    def f_vjp(s_SF: torch.Tensor, cot_SF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(s) (state dtype) and beta cot J_f(s); beta cot df/d(leaves) is added to `acc`."""
        s_leaf = s_SF.to(in_dtype).view(shape).detach().requires_grad_()
        out = call.f(s_leaf, ctx_cut)
        got = torch.autograd.grad(out, [s_leaf, *leaves], (b * cot_SF).view(shape).to(out.dtype),
                                  allow_unused=True)
        for i, g in enumerate(got[1:]):
            if g is not None:
                acc[i] = g if acc[i] is None else acc[i] + g
        g_state = torch.zeros_like(s_SF) if got[0] is None else got[0].reshape(s_SF.shape).to(sdt)
        return out.detach().reshape(s_SF.shape).to(sdt), g_state

    for _ in range(nstep):
        fy_SF, gy_from_z = f_vjp(y_SF, gz_SF)  # z_n = a z + b f(y_n)
        z_SF = (z_SF - b * fy_SF) / a
        gy_SF = gy_SF + gy_from_z
        fz_SF, gz_from_y = f_vjp(z_SF, gy_SF)  # y_n = a y + b f(z)
        y_SF = (y_SF - b * fz_SF) / a
        gz_SF = a * gz_SF + gz_from_y
        gy_SF = a * gy_SF
    z0_SF = call.z0.detach().reshape(z_SF.shape).to(sdt)
    err = max(float(torch.linalg.vector_norm(z_SF - z0_SF)), float(torch.linalg.vector_norm(y_SF - z0_SF)))
    grads = [None if g is None else g.to(t.dtype) for g, t in zip(acc, leaves)]
    return grads, err / max(z_end_norm, 1e-30)


def reversible_apply(call: ReversibleCall, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """z_N, differentiable w.r.t. the differentiable tensors of `call.ctx` and `weights`."""
    keys = [k for k, v in call.ctx.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    tensors = [call.ctx[k] for k in keys] + list(weights)
    return _ReversibleFunction.apply(call, keys, *tensors)


__all__ = ["ReversibleCall", "reverse", "reversible_apply"]
