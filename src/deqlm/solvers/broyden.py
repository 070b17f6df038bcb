"""Broyden's ("good") method for g(z) = f(z) - z = 0, per sample, with bounded memory and no line search.

Inverse-Jacobian estimate H_k of g'(z), H_0 = -I (so the first step is plain iteration), steps s_k = -H_k g_k,
and the good-Broyden update H_{k+1} = H_k + (s_k - H_k y_k) s_k^T H_k / (s_k^T H_k y_k), y_k = g_{k+1} - g_k.
With full steps (no line search) this update collapses to a product of rank-one factors built from the steps
alone (Kelley, "Iterative Methods for Linear and Nonlinear Equations", SIAM 1995, sec. 7.3):

    H_{k+1} = (I + s_{k+1} s_k^T / ||s_k||^2) H_k,   s_{k+1} = -w / (1 + s_k.w / ||s_k||^2),  w = H_k g_{k+1}

So each sample stores one vector per step (the official code stores two, u and v, and preallocates one pair
per allowed step). Only the last `rank` factors are kept (a circular buffer of rank + 1 steps); older ones are
dropped, i.e. treated as H_0. A step applies the kept factors and the new one built from the newest step, so
rank 0 is still a one-factor secant method, not plain iteration.

Applying the product to g is a sequential recursion, c_j = s_j.w_j / ||s_j||^2, w_{j+1} = w_j + c_j s_{j+1}.
Written with the Gram matrix Q = S S^T of the stored steps it becomes a small lower-triangular system,
(diag(||s_j||^2) - [Q_{j,i+1}]_{i<j}) c = -S g, followed by w = -g + sum_j c_j s_{j+1}. Q is updated from
quantities already at hand (s_j.s_{k+1} = -s_j.w / den), so a step reads the stored steps exactly twice, in
two batched matrix products, and does the rest on (rank x rank) float64 matrices.

A sample whose update breaks down (denominator near zero, non-finite step) restarts from H_0: its older
factors are masked out and it takes a plain step.

Kernel count matters as much as bytes (every GPU launch and every CPU dispatch has a fixed cost, however
little it computes): until some sample restarts, steps take a path without per-sample validity masks; the
stored steps are read in chronological order straight from the circular buffer (the Gram block by a slice,
or one roll once the buffer is full), so nothing is gathered or scattered; the new step is computed in its
own slot; whether a restart happened travels to the host with the one synchronisation per step the stopping
test already needs.
"""

# B: batch, F: flattened state size per sample, K: stored steps (rank + 1 slots), N: steps in use, C: chunk

from __future__ import annotations

from collections.abc import Callable

import torch

from deqlm.solvers.common import FlatMap, Tracker, check_common, flatten_start, solver_mode
from deqlm.solvers.result import SolverResult

_CHUNK = 8  # step buffers grow in chunks of this many slots, so memory follows the steps actually taken
_MIN_DEN = 1e-3  # |1 + s_k.w / ||s_k||^2| below this: the secant update is ill-posed, restart the sample


def buffer_slots(rank: int, max_iter: int) -> int:
    """Step vectors a solve may store: rank + 1 (rank factors need their steps and one more), at most one per
    allowed step, at least one."""
    return max(1, min(rank + 1, max_iter))


class _StepBuffer:
    """Circular store of the last K steps per sample, allocated chunk by chunk as steps arrive.

    Slot-major (C, B, F) chunks: a slot is one contiguous (B, F) block, so a new step is computed in its slot
    (no copy, no per-step allocation: on a CPU every fresh megabyte costs page faults) and in-place products
    into it run without a temporary; the batched products read (B, C, F) views. Slots are never
    zero-filled: reads cover only slots the caller has written. Reads go in chronological order, `count`
    slots from slot `first` on, wrapping past K - 1 to 0, so results need no reordering."""

    def __init__(self, B: int, F: int, K: int, like: torch.Tensor):
        self.B, self.F, self.K, self.like = B, F, K, like
        self.chunks: list[torch.Tensor] = []  # each (C, B, F)

    def slot(self, i: int) -> torch.Tensor:
        """(B, F) view of slot i, allocating its chunk when first reached."""
        while i >= len(self.chunks) * _CHUNK:
            C = min(_CHUNK, self.K - len(self.chunks) * _CHUNK)
            self.chunks.append(self.like.new_empty(C, self.B, self.F))
        return self.chunks[i // _CHUNK][i % _CHUNK]

    def _runs(self, first: int, count: int) -> list[tuple[int, torch.Tensor]]:
        """(position, (B, F, C) view) covering slots first, first + 1, ... (mod K), `count` in all."""
        runs, pos = [], 0
        while pos < count:
            c, off = divmod((first + pos) % self.K, _CHUNK)
            n = min(self.chunks[c].shape[0] - off, count - pos)
            runs.append((pos, self.chunks[c][off : off + n].permute(1, 2, 0)))
            pos += n
        return runs

    def dots(self, v_B1F: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """(B, 1, count): s . v for each slot read, in reading order (v_B1F: a (B, 1, F) view)."""
        parts = [torch.bmm(v_B1F, run_BFC) for _, run_BFC in self._runs(first, count)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def combine(self, out_B1F: torch.Tensor, coef_B1n: torch.Tensor, first: int) -> None:
        """out += sum over the n slots read from `first` on of coef[position] * s (out: (B, 1, F) view of
        another slot)."""
        for pos, run_BFC in self._runs(first, coef_B1n.shape[2]):
            out_B1F.baddbmm_(coef_B1n[:, :, pos : pos + run_BFC.shape[2]], run_BFC.mT)


def broyden(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 30,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    rank: int = 30,
    explode: float = 1e3,
) -> SolverResult:
    """Find z = f(z) by good Broyden from z0; at most `max_iter` steps (`max_iter + 1` evaluations of f).

    `rank`: how many low-rank factors of the inverse Jacobian each sample keeps between steps (memory:
    rank + 1 vectors of the sample's size, allocated only as steps are taken); each step applies them and one
    more, from its newest step. Stopping, freezing and the returned lowest-residual iterate per sample are as
    in `deqlm.solvers.common`. Runs without an autograd graph.
    """
    check_common(max_iter, tol, stop_mode, explode)
    if rank < 0:
        raise ValueError(f"rank={rank!r} must be >= 0")
    with solver_mode(z0.device.type) as caller_autocast:
        fmap = FlatMap(f, z0, caller_autocast)
        z_BF = flatten_start(z0)
        B, F = z_BF.shape
        dev = z_BF.device
        track = Tracker(z_BF, tol, stop_mode, explode)
        fz_BF = fmap(z_BF)
        g_BF = fz_BF - z_BF
        track.observe(z_BF, fz_BF, g_BF)
        del fz_BF  # not needed past the stopping test: released before f runs again (one vector less at peak)
        K = buffer_slots(rank, max_iter)
        steps = _StepBuffer(B, F, K, z_BF)
        gram_BKK = torch.zeros(B, K, K, dtype=torch.float64, device=dev)
        start_B = torch.zeros(B, dtype=torch.long, device=dev)  # first step of each sample's current run
        spare_BF = torch.empty_like(z_BF)
        clean = True  # no sample has restarted yet: the unmasked path applies
        nstep = 0
        restarts = torch.zeros((), dtype=torch.float32, device=dev)
        while nstep < max_iter and track.any_active():
            clean = clean and track.flag == 0
            # s_0 = -H_0 g_0 = g_0; later steps from the stored ones
            if nstep == 0:
                s_BF = steps.slot(0).copy_(g_BF)
                gram_BKK[:, 0, 0] = torch.linalg.vector_norm(s_BF, dim=1).double() ** 2
            else:
                s_BF, restarts = _next_step(steps, gram_BKK, start_B, g_BF, nstep, masked=not clean)
            del g_BF  # like f(z) above: released while f runs, whose own temporaries set the peak
            # iterates alternate between two buffers of the solver's own (see Tracker)
            z_BF, spare_BF = track.freeze(torch.add(z_BF, s_BF, out=spare_BF), inplace=True), z_BF
            fz_BF = fmap(z_BF)
            g_BF = fz_BF - z_BF
            nstep += 1
            track.observe(z_BF, fz_BF, g_BF, flag=restarts)
            del fz_BF
        return track.result(fmap, nstep)


def _next_step(
    steps: _StepBuffer, gram_BKK: torch.Tensor, start_B: torch.Tensor, g_BF: torch.Tensor, k1: int,
    masked: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step s_{k+1} from g_{k+1} (k1 = k + 1 steps taken). Updates gram and start in place; returns the
    step and the number of samples that restart now (they take the plain step s = g).

    Stored are s_lo..s_k (N of them, chronological from slot `first`); the factors are j = lo..k-1. With
    e_j = s_j . g and T the lower-triangular matrix with diagonal ||s_j||^2 and entries -s_j . s_{i+1} below
    it, the coefficients are c = T^-1 e (the recursion's c_j with the sign flipped), v_j = e_j + sum_i
    (s_j . s_{i+1}) c_i = -(s_j . w) for every stored j, den = 1 - v_k / ||s_k||^2, and
    s_{k+1} = (g + sum_j c_j s_{j+1}) / den.

    `masked`: some sample restarted earlier, so factors older than a sample's restart are masked out (their
    rows of T become identity rows with a zero right-hand side, i.e. c_j = 0). Without it the same
    arithmetic runs without those kernels."""
    K = steps.K
    N = min(k1, K)
    first = (k1 - N) % K  # slot of s_lo
    e_BN = steps.dots(g_BF[:, None], first, N)[:, 0].double()
    Q_BNN = gram_BKK[:, :N, :N] if first == 0 else gram_BKK.roll((-first, -first), dims=(1, 2))
    sq_BN = Q_BNN.diagonal(dim1=1, dim2=2)
    tri_BNN = Q_BNN[:, :-1, 1:].tril(-1).neg_()
    tri_BNN.diagonal(dim1=1, dim2=2).copy_(sq_BN[:, :-1])
    rhs_BN1 = e_BN[:, :-1, None]
    if masked:
        t_N = torch.arange(k1 - N, k1, device=g_BF.device)
        valid_BN = (t_N[None] >= start_B[:, None]) & (sq_BN > 0)
        fac_BN1 = valid_BN[:, :-1, None]
        eye_NN = torch.eye(N - 1, dtype=tri_BNN.dtype, device=tri_BNN.device)
        tri_BNN = torch.where(fac_BN1, tri_BNN, eye_NN)
        rhs_BN1 = torch.where(fac_BN1, rhs_BN1, 0.0)
    c_BN1 = torch.linalg.solve_triangular(tri_BNN, rhs_BN1, upper=False)
    v_BN = torch.baddbmm(e_BN[..., None], Q_BNN[:, :, 1:], c_BN1)[..., 0]
    c_BN = c_BN1[..., 0]
    den_B = 1.0 - v_BN[:, -1] / sq_BN[:, -1]
    # a non-finite coefficient makes `a` NaN, and every comparison with NaN is false
    a_B = (den_B + 0.0 * c_BN.sum(dim=1)).abs_()
    ok_B = (a_B >= _MIN_DEN) & (a_B < torch.inf)
    if masked:
        ok_B = ok_B & valid_BN[:, -1]
    inv_B = torch.where(ok_B, den_B, 1.0).reciprocal_()
    # the new step goes to slot `new`: past the stored ones, or once the buffer is full over s_lo, which
    # only enters through T (already solved) and is not read below
    new = k1 % K
    s_BF = torch.mul(g_BF, inv_B.to(g_BF.dtype)[:, None], out=steps.slot(new))
    coef_BN = (c_BN * (inv_B * ok_B)[:, None]).to(g_BF.dtype)  # restarting samples: all zero
    steps.combine(s_BF[:, None], coef_BN[:, None], first=(first + 1) % K)
    bad_B = ~ok_B
    start_B.masked_fill_(bad_B, k1)
    # Gram entries of the new step with the stored ones: s_j . s_{k+1} = v_j / den, or e_j for a plain step
    col_BN = torch.where(ok_B[:, None], v_BN * inv_B[:, None], e_BN)
    if first:
        col_BN = col_BN.roll(first, dims=1)  # back to slot order
    gram_BKK[:, new, :N] = col_BN
    gram_BKK[:, :N, new] = col_BN
    gram_BKK[:, new, new] = torch.linalg.vector_norm(s_BF, dim=1).double().square_()
    return s_BF, bad_B.sum(dtype=torch.float32)
