"""Anderson acceleration (type II) with per-sample history and scale-free regularisation.

Each sample keeps its last m pairs (f(z_i), g_i = f(z_i) - z_i). A step mixes them,

    alpha = argmin ||sum_i alpha_i g_i||^2 + lam_eff ||alpha||^2   subject to sum_i alpha_i = 1,
    z_new = sum_i alpha_i (f(z_i) - (1 - beta) g_i),

solved through the Gram matrix G G^T (kept up to date one row per step) as (G G^T + lam_eff I) a = 1,
alpha = a / sum(a), by a Cholesky factorisation in float64. lam_eff = lam * trace(G G^T) / n scales with the
residuals' own size: the fixed absolute lambda of the common DEQ implementations swamps G G^T once ||g||^2
falls below it, and the mixing then degrades to averaging the last iterates, which stops accelerating exactly
near the solution. When the factorisation fails or yields non-finite weights the step falls back to plain
(damped) iteration for that sample.
"""

# B: batch, F: flattened state size per sample, M: history slots, N: filled slots

from __future__ import annotations

from collections.abc import Callable

import torch

from deqlm.solvers.common import FlatMap, Tracker, check_common, flatten_start, solver_mode
from deqlm.solvers.result import SolverResult


def history_slots(m: int, max_iter: int) -> int:
    """(f(z), g) pairs a solve keeps: the last m, at most one per allowed step, at least one."""
    return max(1, min(m, max_iter))


def mixing_weights(gram_BNN: torch.Tensor, lam: float, newest: int) -> torch.Tensor:
    """Anderson weights (B, N) from the residual Gram matrix; plain iteration (one-hot newest) on failure.

    A dozen small kernels (each costs microseconds, as much as a small f on a GPU): the regulariser is added
    to a copy's diagonal in place, and the fallback is a one-hot row built without an identity matrix."""
    B, N, _ = gram_BNN.shape
    A_BNN = gram_BNN.clone()
    diag_BN = A_BNN.diagonal(dim1=1, dim2=2)
    diag_BN.add_(diag_BN.mean(dim=1, keepdim=True).mul_(lam).add_(torch.finfo(A_BNN.dtype).tiny))
    L_BNN, info_B = torch.linalg.cholesky_ex(A_BNN)
    a_BN = torch.cholesky_solve(A_BNN.new_ones(B, N, 1), L_BNN)[..., 0]
    alpha_BN = a_BN / a_BN.sum(dim=1, keepdim=True)
    ok_B1 = ((info_B == 0) & torch.isfinite(alpha_BN).all(dim=1))[:, None]
    plain_1N = A_BNN.new_zeros(1, N)
    plain_1N[0, newest] = 1.0
    return torch.where(ok_B1, alpha_BN, plain_1N)


def anderson(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 30,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    m: int = 6,
    beta: float = 1.0,
    lam: float = 1e-2,
    explode: float = 1e3,
) -> SolverResult:
    """Find z = f(z) by Anderson acceleration from z0; at most `max_iter` steps (`max_iter + 1` evaluations).

    `m`: history size; `beta`: mixing (1: undamped); `lam`: Tikhonov regularisation relative to the mean
    squared residual norm of the history. Stopping, freezing and the returned lowest-residual iterate per
    sample are as in `deqlm.solvers.common`. Runs without an autograd graph.
    """
    check_common(max_iter, tol, stop_mode)
    if m < 1:
        raise ValueError(f"m={m!r} must be >= 1")
    if not 0 < beta <= 2:
        raise ValueError(f"beta={beta!r} must lie in (0, 2]")
    if not lam >= 0:
        raise ValueError(f"lam={lam!r} must be >= 0")
    with solver_mode(z0.device.type) as caller_autocast:
        fmap = FlatMap(f, z0, caller_autocast)
        z_BF = flatten_start(z0)
        B, F = z_BF.shape
        track = Tracker(z_BF, tol, stop_mode, explode)
        fz_BF = fmap(z_BF)
        g_BF = fz_BF - z_BF
        track.observe(z_BF, fz_BF, g_BF)
        M = history_slots(m, max_iter)
        # slot-major histories (M, B, F): a slot is one contiguous (B, F) block. g is computed straight into
        # the slot it will occupy, and the next iterate into a spare buffer, so a step allocates nothing
        # (on a CPU every fresh megabyte costs page faults)
        f_MBF = g_MBF = gram_BMM = None
        spare_BF = torch.empty_like(z_BF)  # iterates alternate between two buffers (see Tracker)
        nstep = 0
        while nstep < max_iter and track.any_active():
            slot = nstep % M
            if f_MBF is None:  # allocated only once a step is needed
                f_MBF, g_MBF = z_BF.new_empty(M, B, F), z_BF.new_empty(M, B, F)
                gram_BMM = torch.zeros(B, M, M, dtype=torch.float64, device=z_BF.device)
                g_MBF[slot] = g_BF
            f_MBF[slot] = fz_BF
            del fz_BF  # copied: released before f runs again (one vector less at peak)
            N = min(nstep + 1, M)
            fs_BNF, gs_BNF = f_MBF[:N].transpose(0, 1), g_MBF[:N].transpose(0, 1)
            row_BN = torch.bmm(g_MBF[slot][:, None], gs_BNF.mT)[:, 0].double()
            gram_BMM[:, slot, :N] = row_BN
            gram_BMM[:, :N, slot] = row_BN
            alpha_BN = mixing_weights(gram_BMM[:, :N, :N], lam, newest=slot).to(z_BF.dtype)
            z_BF, spare_BF = spare_BF, z_BF
            z_B1F = z_BF[:, None]
            torch.bmm(alpha_BN[:, None], fs_BNF, out=z_B1F)
            if beta != 1.0:
                z_B1F.baddbmm_(alpha_BN[:, None], gs_BNF, alpha=-(1.0 - beta))
            z_BF = track.freeze(z_BF, inplace=True)
            fz_BF = fmap(z_BF)
            nstep += 1
            g_BF = torch.sub(fz_BF, z_BF, out=g_MBF[nstep % M])
            track.observe(z_BF, fz_BF, g_BF)
        return track.result(fmap, nstep)
