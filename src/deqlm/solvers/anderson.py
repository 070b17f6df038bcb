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


def mixing_weights(
    gram_BNN: torch.Tensor, lam: float, plain_1N: torch.Tensor, ones_BN1: torch.Tensor
) -> torch.Tensor:
    """Anderson weights (B, N) from the residual Gram matrix; `plain_1N` (the one-hot newest slot, i.e. plain
    iteration) for a sample whose system is not positive definite or whose weights are not finite.

    A dozen small kernels, each dearer than its arithmetic (a launch on a GPU, a dispatch on a CPU right
    after f has evicted the caches): the regulariser goes onto a copy's diagonal in place, and validity is
    read off the weights' sum, which is 1 whenever all of them are finite (a NaN or an infinity anywhere
    makes it NaN or infinite)."""
    A_BNN = gram_BNN.clone()
    diag_BN = A_BNN.diagonal(dim1=1, dim2=2)
    diag_BN.add_(diag_BN.mean(dim=1, keepdim=True), alpha=lam)
    L_BNN, info_B = torch.linalg.cholesky_ex(A_BNN)
    a_BN = torch.cholesky_solve(ones_BN1, L_BNN)[..., 0]
    alpha_BN = a_BN / a_BN.sum(dim=1, keepdim=True)
    ok_B1 = (alpha_BN.sum(dim=1, keepdim=True).sub_(1.0).abs_() < 0.5) & (info_B == 0)[:, None]
    return torch.where(ok_B1, alpha_BN, plain_1N)


class _History:
    """The last M pairs (f(z_i), g_i) per sample and the Gram matrix of the g's.

    Slot-major (M, B, F) stores: a slot is one contiguous (B, F) block, so g is computed straight into the
    slot it will occupy and a step allocates nothing (on a CPU every fresh megabyte costs page faults). Every
    view a step reads is made here once (each is a dispatcher call too); `fs_BNF[N - 1]` and
    `gs_BFN[N - 1]` read the first N slots."""

    def __init__(self, g0_BF: torch.Tensor, M: int):
        B, F = g0_BF.shape
        self.f_MBF, self.g_MBF = g0_BF.new_empty(M, B, F), g0_BF.new_empty(M, B, F)
        self.g_MBF[0] = g0_BF
        self.gram_BMM = torch.zeros(B, M, M, dtype=torch.float64, device=g0_BF.device)
        self.eye_MM = torch.eye(M, dtype=torch.float64, device=g0_BF.device)
        self.ones_BM1 = self.gram_BMM.new_ones(B, M, 1)
        self.g_B1F = [self.g_MBF[i][:, None] for i in range(M)]
        self.fs_BNF = [self.f_MBF[:N].transpose(0, 1) for N in range(1, M + 1)]
        self.gs_BFN = [self.g_MBF[:N].permute(1, 2, 0) for N in range(1, M + 1)]


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
    sample are as in `deqlm.solvers.common`. Runs without an autograd graph."""
    check_common(max_iter, tol, stop_mode, explode)
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
        hist: _History | None = None  # allocated only once a step is needed
        spare_BF = torch.empty_like(z_BF)  # iterates alternate between two buffers (see Tracker)
        nstep = 0
        while nstep < max_iter and track.any_active():
            slot, N = nstep % M, min(nstep + 1, M)
            if hist is None:
                hist = _History(g_BF, M)
                del g_BF
            hist.f_MBF[slot] = fz_BF
            del fz_BF  # copied: released before f runs again (one vector less at peak)
            row_BN = torch.bmm(hist.g_B1F[slot], hist.gs_BFN[N - 1])[:, 0]
            hist.gram_BMM[:, slot, :N] = row_BN
            hist.gram_BMM[:, :N, slot] = row_BN
            alpha_BN = mixing_weights(
                hist.gram_BMM[:, :N, :N], lam, hist.eye_MM[slot : slot + 1, :N], hist.ones_BM1[:, :N]
            )
            alpha_B1N = alpha_BN.to(z_BF.dtype)[:, None]
            z_BF, spare_BF = spare_BF, z_BF
            torch.bmm(alpha_B1N, hist.fs_BNF[N - 1], out=z_BF[:, None])
            if beta != 1.0:
                z_BF[:, None].baddbmm_(alpha_B1N, hist.gs_BFN[N - 1].mT, alpha=-(1.0 - beta))
            z_BF = track.freeze(z_BF, inplace=True)
            fz_BF = fmap(z_BF)
            nstep += 1
            g_BF = torch.sub(fz_BF, z_BF, out=hist.g_MBF[nstep % M])
            track.observe(z_BF, fz_BF, g_BF)
        return track.result(fmap, nstep)
