"""Broyden's ("good") method for g(z) = f(z) - z = 0, per sample, with bounded memory and no line search.

Inverse-Jacobian estimate H_k of g'(z), H_0 = -I (so the first step is plain iteration), steps s_k = -H_k g_k,
and the good-Broyden update H_{k+1} = H_k + (s_k - H_k y_k) s_k^T H_k / (s_k^T H_k y_k), y_k = g_{k+1} - g_k.
With full steps (no line search) this update collapses to a product of rank-one factors built from the steps
alone (Kelley, "Iterative Methods for Linear and Nonlinear Equations", SIAM 1995, sec. 7.3):

    H_{k+1} = (I + s_{k+1} s_k^T / ||s_k||^2) H_k,   s_{k+1} = -w / (1 + s_k.w / ||s_k||^2),  w = H_k g_{k+1}

So each sample stores one vector per step (the official code stores two, u and v, and preallocates one pair
per allowed step). Only the last `rank` factors are kept (a circular buffer of rank + 1 steps); older ones are
dropped, i.e. treated as H_0.

Applying the product to g is a sequential recursion, c_j = s_j.w_j / ||s_j||^2, w_{j+1} = w_j + c_j s_{j+1}.
Written with the Gram matrix Q = S S^T of the stored steps it becomes a small lower-triangular system,
(diag(||s_j||^2) - [Q_{j,i+1}]_{i<j}) c = -S g, followed by w = -g + sum_j c_j s_{j+1}. Q is updated from
quantities already at hand (s_j.s_{k+1} = -s_j.w / den), so a step reads the stored steps exactly twice, in
two batched matrix products, and does the rest on (rank x rank) float64 matrices.

A sample whose update breaks down (denominator near zero, non-finite step) restarts from H_0: its older
factors are masked out and it takes a plain step.

Kernel count matters as much as bytes (a GPU launch costs microseconds, and a CPU dispatch about as
much): until some sample restarts, steps take a path without per-sample validity masks, reading the stored
steps' Gram block by slicing while the buffer has not wrapped; whether a restart happened travels to the host
with the one synchronisation per step the stopping test already needs.
"""

# B: batch, F: flattened state size per sample, K: stored steps (rank + 1 slots), N: steps in use, C: chunk

from __future__ import annotations

from collections.abc import Callable

import torch

from deqlm.solvers.common import FlatMap, Tracker, check_common, flatten_start, solver_mode
from deqlm.solvers.result import SolverResult

_CHUNK = 8  # step buffers grow in chunks of this many slots, so memory follows the steps actually taken
_MIN_DEN = 1e-3  # |1 + s_k.w / ||s_k||^2| below this: the secant update is ill-posed, restart the sample


class _StepBuffer:
    """Circular store of the last K steps per sample, allocated chunk by chunk as steps arrive."""

    def __init__(self, B: int, F: int, K: int, like: torch.Tensor):
        self.B, self.F, self.K, self.like = B, F, K, like
        self.chunks: list[torch.Tensor] = []  # each (B, C, F)

    def put(self, slot: int, s_BF: torch.Tensor) -> None:
        while slot >= len(self.chunks) * _CHUNK:
            C = min(_CHUNK, self.K - len(self.chunks) * _CHUNK)
            self.chunks.append(self.like.new_zeros(self.B, C, self.F))
        self.chunks[slot // _CHUNK][:, slot % _CHUNK] = s_BF

    def allocated(self) -> int:
        return sum(c_BCF.shape[1] for c_BCF in self.chunks)

    def dots(self, v_BF: torch.Tensor) -> torch.Tensor:
        """(B, slots allocated): s_slot . v for every slot."""
        return torch.cat([torch.bmm(v_BF[:, None], c_BCF.mT)[:, 0] for c_BCF in self.chunks], dim=1)

    def combine(self, base_BF: torch.Tensor, coef_BK: torch.Tensor) -> torch.Tensor:
        """base + sum over slots of coef[slot] * s_slot, accumulated into `base` (which must be a fresh
        tensor)."""
        out_B1F = base_BF[:, None]
        for i, c_BCF in enumerate(self.chunks):
            out_B1F.baddbmm_(coef_BK[:, None, i * _CHUNK : i * _CHUNK + c_BCF.shape[1]], c_BCF)
        return out_B1F[:, 0]


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

    `rank`: how many low-rank factors of the inverse Jacobian each sample keeps (memory: rank + 1 vectors of
    the sample's size, allocated only as steps are taken). Stopping, freezing and the returned lowest-residual
    iterate per sample are as in `deqlm.solvers.common`. Runs without an autograd graph.
    """
    check_common(max_iter, tol, stop_mode)
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
        K = max(1, min(rank + 1, max_iter))
        steps = _StepBuffer(B, F, K, z_BF)
        gram_BKK = torch.zeros(B, K, K, dtype=torch.float64, device=dev)
        start_B = torch.zeros(B, dtype=torch.long, device=dev)  # first step of each sample's current run
        order = _Order(K, dev)
        clean = True  # no sample has restarted yet: the unmasked path applies
        nstep = 0
        restarts = torch.zeros((), dtype=torch.float32, device=dev)
        while nstep < max_iter and track.any_active(restarts):
            clean = clean and track.flag == 0
            # s_0 = -H_0 g_0 = g_0; later steps from the stored ones
            if nstep == 0:
                s_BF = g_BF
                gram_BKK[:, 0, 0] = torch.linalg.vector_norm(s_BF, dim=1).double() ** 2
            else:
                s_BF, restarts = _next_step(steps, gram_BKK, start_B, g_BF, nstep, order, masked=not clean)
            steps.put(nstep % K, s_BF)
            z_BF = track.freeze(
                z_BF.add_(s_BF), inplace=True
            )  # z_BF is the solver's own buffer (see flatten_start)
            fz_BF = fmap(z_BF)
            g_BF = torch.sub(fz_BF, z_BF, out=g_BF if nstep > 0 else None)
            nstep += 1
            track.observe(z_BF, fz_BF, g_BF)
        return track.result(fmap, nstep)


class _Order:
    """Where the stored steps sit in the circular buffer, oldest first, for k1 steps taken (cached per solve).

    Before the buffer wraps (k1 <= K) the order is slots 0..k1-1 and `index` is None (callers slice); after,
    a device index tensor, built once per wrap position."""

    def __init__(self, K: int, device: torch.device):
        self.K, self.device = K, device
        self.cache: dict[int, torch.Tensor] = {}

    def lo(self, k1: int) -> int:
        return max(0, k1 - self.K)

    def index(self, k1: int) -> torch.Tensor | None:
        if k1 <= self.K:
            return None
        key = k1 % self.K
        if key not in self.cache:
            chrono = [t % self.K for t in range(k1 - self.K, k1)]
            self.cache[key] = torch.tensor(chrono, device=self.device)
        return self.cache[key]

    def full_index(self, k1: int) -> torch.Tensor:
        idx = self.index(k1)
        return torch.arange(k1, device=self.device) if idx is None else idx


def _take(x: torch.Tensor, idx: torch.Tensor | None, n: int, dim: int) -> torch.Tensor:
    """The n stored entries along `dim`, oldest first: a slice before the buffer wraps, a gather after."""
    if idx is None:
        return x.narrow(dim, 0, n)
    return x.index_select(dim, idx)


def _next_step(
    steps: _StepBuffer, gram_BKK: torch.Tensor, start_B: torch.Tensor, g_BF: torch.Tensor, k1: int,
    order: _Order, masked: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step s_{k+1} from g_{k+1} (k1 = k + 1 steps stored). Updates gram and start in place; returns the
    step and the number of samples that restart now (they take the plain step s = g).

    `masked`: some sample restarted earlier, so factors older than a sample's restart are masked out (their
    rows of the triangular system become identity rows with a zero right-hand side, i.e. c_j = 0). Without it
    the same arithmetic runs without those kernels."""
    N = min(k1, order.K)
    idx = order.index(k1)
    d_BN = _take(steps.dots(g_BF), idx, N, 1).double().neg_()  # -s_j . g
    Q_BNN = _take(_take(gram_BKK, idx, N, 1), idx, N, 2)
    sq_BN = Q_BNN.diagonal(dim1=1, dim2=2)
    # triangular system over the factors j = lo..k-1: diag ||s_j||^2, below it -s_j . s_{i+1}
    tri_BNN = torch.diag_embed(sq_BN[:, :-1]) - torch.tril(Q_BNN[:, :-1, 1:], diagonal=-1)
    rhs_BN = d_BN[:, :-1]
    if masked:
        t_N = torch.arange(order.lo(k1), k1, device=g_BF.device)
        valid_BN = (t_N[None] >= start_B[:, None]) & (sq_BN > 0)
        fac_BN = valid_BN[:, :-1]
        eye_NN = torch.eye(N - 1, dtype=tri_BNN.dtype, device=tri_BNN.device)
        tri_BNN = torch.where(fac_BN[:, :, None], tri_BNN, eye_NN)
        rhs_BN = torch.where(fac_BN, rhs_BN, 0.0)
    c_BN = torch.linalg.solve_triangular(tri_BNN, rhs_BN[..., None], upper=False)[..., 0]
    sw_BN = torch.baddbmm(d_BN[..., None], Q_BNN[:, :, 1:], c_BN[..., None])[..., 0]  # s_j . w, every j
    den_B = 1.0 + sw_BN[:, -1] / sq_BN[:, -1]
    a_B = den_B.abs()
    ok_B = (a_B >= _MIN_DEN) & (a_B < torch.inf) & torch.isfinite(c_BN).all(dim=1)
    if masked:
        ok_B = ok_B & valid_BN[:, -1]
    # s = -w / den = (g - sum_j c_j s_{j+1}) / den; factor j's coefficient goes to the slot of s_{j+1}
    inv_B = torch.where(ok_B, den_B.reciprocal(), 1.0)
    coef_BN = torch.where(ok_B[:, None], c_BN * inv_B[:, None], 0.0).neg_().to(g_BF.dtype)
    A = steps.allocated()
    if idx is None:  # slots 1..N-1 hold s_{lo+1}..s_k
        coef_BA = torch.nn.functional.pad(coef_BN, (1, A - N))
    else:
        coef_BA = g_BF.new_zeros(g_BF.shape[0], A).index_copy_(1, idx[1:], coef_BN)
    s_BF = steps.combine(g_BF * inv_B.to(g_BF.dtype)[:, None], coef_BA)
    bad_B = ~ok_B
    start_B.masked_fill_(bad_B, k1)
    # Gram entries of the new step with the stored ones (slot `new` may overwrite the oldest, steps[lo]):
    # s_j . s_{k+1} = -s_j . w / den, or -s_j . g for a plain step
    new = k1 % order.K
    col_BN = torch.where(ok_B[:, None], sw_BN * inv_B[:, None], d_BN).neg_()
    if idx is None:
        gram_BKK[:, new, :N] = col_BN
        gram_BKK[:, :N, new] = col_BN
    else:
        gram_BKK[:, new, idx] = col_BN
        gram_BKK[:, idx, new] = col_BN
    gram_BKK[:, new, new] = torch.linalg.vector_norm(s_BF, dim=1).double().square_()
    return s_BF, bad_B.sum(dtype=torch.float32)
