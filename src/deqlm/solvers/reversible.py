"""The reversible fixed-point iteration (McCallum, Arora, Foster, "Reversible Deep Equilibrium Models", 2025).

Two states start from z0 and are relaxed in turn with a mixing weight beta in (0, 2), beta != 1:

    y' = (1 - beta) y + beta f(z)
    z' = (1 - beta) z + beta f(y')

Each step is a bijection of (y, z) whose inverse needs only f: z = (z' - beta f(y')) / (1 - beta), then
y = (y' - beta f(z)) / (1 - beta). The backward pass (`deqlm.deq.reversible`) rebuilds every state from the
last one instead of storing it, which is what makes exact backpropagation through all the steps cost memory
independent of their number. f(z') is kept after each step: the next step's y update needs it, and so does
the stopping test ||f(z') - z'|| (over ||f(z')|| in `rel` mode). A step therefore costs two evaluations of f,
the start one more.

Unlike the quasi-Newton solvers, the iteration stops for the whole batch at once (when every sample is within
`tol`, or when a residual turns non-finite or explodes) and returns its last iterate, not the best one: the
gradient is that of the computation that ran, so every sample must run the same number of steps and the
output must be the state the reversal starts from.

Every reversal divides by |1 - beta|, so a rounding error made in the forward states grows by that factor per
step when they are rebuilt. The states are therefore kept in `state_dtype` (float64 by default, as in the
reference code) while f computes in the caller's dtype; docs/solvers.md has the measured reconstruction
errors.
"""

# B: batch, F: flattened state size per sample (the states are (B, F) rows in the state dtype: suffix _SF)

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deqlm.choices import check_beta
from deqlm.solvers.common import _TINY, check_common, solver_mode
from deqlm.solvers.result import SolverResult


@dataclass
class ReversibleRun:
    """A forward pass: the solver's result (its `z` in the caller's dtype) and both final states in the state
    dtype, from which the backward pass rebuilds the rest."""

    result: SolverResult
    z_SF: torch.Tensor
    y_SF: torch.Tensor
    beta: float  # the relaxation the steps used (the reversal needs the same)


def state_map(f: Callable, z0: torch.Tensor, state_dtype: torch.dtype, caller_autocast) -> Callable:
    """f on (B, F) state rows: the state rounded to z0's dtype goes in, f's output comes back in the state
    dtype. The state itself is never rounded (the reversal needs it exact)."""
    shape, in_dtype = z0.shape, z0.dtype

    def fmap(s_SF: torch.Tensor) -> torch.Tensor:
        with caller_autocast():
            out = f(s_SF.to(in_dtype).view(shape))
        if out.shape != shape:
            raise ValueError(f"f changed the shape of z: {tuple(shape)} -> {tuple(out.shape)}")
        return out.reshape(s_SF.shape).to(state_dtype)

    return fmap


def _residuals(z_SF: torch.Tensor, fz_SF: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """Per-sample ||f(z) - z||, ||f(z) - z|| / ||f(z)|| and ||f(z)||, on the host (a step's one sync)."""
    B = z_SF.shape[0]
    norms = torch.cat(
        [torch.linalg.vector_norm(fz_SF - z_SF, dim=1), torch.linalg.vector_norm(fz_SF, dim=1)]
    ).tolist()
    abs_B, fnorm_B = norms[:B], norms[B:]
    return abs_B, [a / (n + _TINY) for a, n in zip(abs_B, fnorm_B)], fnorm_B


def reversible_run(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 8,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    beta: float = 0.5,
    state_dtype: str = "float64",
    explode: float = 1e3,
) -> ReversibleRun:
    """At most `max_iter` reversible steps from y = z = z0 (2 max_iter + 1 evaluations of f), no graph."""
    check_common(max_iter, tol, stop_mode, explode)
    check_beta(beta)
    if z0.dim() == 0 or z0.numel() == 0:
        raise ValueError(f"z0 must have a batch dimension and elements (shape {tuple(z0.shape)})")
    sdt = getattr(torch, state_dtype)
    with solver_mode(z0.device.type) as caller_autocast:
        fmap = state_map(f, z0, sdt, caller_autocast)
        z_SF = z0.detach().reshape(z0.shape[0], -1).to(sdt, copy=True)
        y_SF = z_SF
        fz_SF = fmap(z_SF)
        abs_B, rel_B, fnorm_B = _residuals(z_SF, fz_SF)
        limit_B = [a * explode if math.isfinite(a) else math.inf for a in abs_B]
        abs_trace, rel_trace = [abs_B], [rel_B]
        nstep = 0
        while nstep < max_iter and not _stop(abs_trace[-1], rel_trace[-1], limit_B, tol, stop_mode):
            y_SF = torch.add(y_SF, fz_SF - y_SF, alpha=beta)  # (1 - beta) y + beta f(z)
            z_SF = torch.add(z_SF, fmap(y_SF) - z_SF, alpha=beta)  # (1 - beta) z + beta f(y')
            fz_SF = fmap(z_SF)
            nstep += 1
            abs_B, rel_B, fnorm_B = _residuals(z_SF, fz_SF)
            abs_trace.append(abs_B)
            rel_trace.append(rel_B)
        result = _result(z0, z_SF, nstep, abs_trace, rel_trace, fnorm_B, tol, stop_mode)
    return ReversibleRun(result, z_SF, y_SF, beta)


def _stop(abs_B: list[float], rel_B: list[float], limit_B: list[float], tol: float, stop_mode: str) -> bool:
    """Done when every sample is within tol; given up when any residual is non-finite or past its limit."""
    res_B = rel_B if stop_mode == "rel" else abs_B
    if all(r <= tol for r in res_B):
        return True
    return any(not math.isfinite(a) or a > lim for a, lim in zip(abs_B, limit_B))


def _result(z0, z_SF, nstep, abs_trace, rel_trace, fnorm_B, tol, stop_mode) -> SolverResult:
    abs_B, rel_B = abs_trace[-1], rel_trace[-1]
    res_B = rel_B if stop_mode == "rel" else abs_B
    abs_tot = math.sqrt(sum(a * a for a in abs_B))
    f_tot = math.sqrt(sum(n * n for n in fnorm_B))
    rel_tot = abs_tot / f_tot if f_tot > 0 else (math.inf if abs_tot > 0 else 0.0)
    dev, dt = z0.device, z_SF.dtype
    return SolverResult(
        z=z_SF.to(z0.dtype).view(z0.shape),
        nstep=nstep,
        f_evals=2 * nstep + 1,
        abs_res=abs_tot,
        rel_res=rel_tot if math.isfinite(abs_tot) else math.inf,
        abs_res_B=torch.tensor(abs_B, dtype=dt, device=dev),
        rel_res_B=torch.tensor(rel_B, dtype=dt, device=dev),
        converged=all(r <= tol for r in res_B),
        converged_B=torch.tensor([r <= tol for r in res_B], device=dev),
        abs_trace=torch.tensor(abs_trace, dtype=dt, device=dev),
        rel_trace=torch.tensor(rel_trace, dtype=dt, device=dev),
    )


def reversible(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, **options) -> SolverResult:
    """The reversible iteration as a plain solver (no graph): what a model trained with the reversible
    gradient runs at evaluation, where nothing needs reversing. Takes `reversible_run`'s keywords; `max_iter`
    counts steps of two f each."""
    return reversible_run(f, z0, **options).result
