"""Helpers shared by the solvers: the flattened map, per-sample bookkeeping, precision handling.

Every solver works on g(z) = f(z) - z with each sample flattened to one row of a (B, F) matrix. Per sample it
keeps the lowest-residual iterate, decides convergence (residual <= tol) and divergence (non-finite residual,
or a residual that explodes past `explode` times the first one), and after that the sample is frozen: its
iterate never changes again, so a hard sample cannot move an easy one off its fixed point. f itself is still
called on the whole batch (a Transformer block needs the full tensor); frozen rows are passed their final
iterate, and only active rows are updated.
"""

# B: batch, F: flattened state size per sample, T: recorded f-evaluations

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from deqlm.choices import StopMode, values
from deqlm.infra.precision import working_dtype
from deqlm.solvers.result import SolverResult

STOP_MODES = values(StopMode)
_TINY = 1e-30  # keeps ||f(z)|| = 0 from dividing by zero in the relative residual


def check_common(max_iter: int, tol: float, stop_mode: str, explode: float) -> None:
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode={stop_mode!r} is not one of {', '.join(STOP_MODES)}")
    if max_iter < 0:
        raise ValueError(f"max_iter={max_iter!r} must be >= 0")
    if not tol >= 0:
        raise ValueError(f"tol={tol!r} must be >= 0")
    if not explode >= 1:  # below 1 the first iterate itself would count as exploded
        raise ValueError(f"explode={explode!r} must be >= 1 (inf: never stop a sample for growing)")


@contextlib.contextmanager
def solver_mode(device_type: str) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """No autograd graph and no autocast for the solver's own arithmetic.

    Yields a factory of context managers that restore the caller's autocast state around calls of f, so f runs
    in mixed precision when the caller asked for it while the quasi-Newton algebra stays in float32 or better.
    """
    enabled = torch.is_autocast_enabled(device_type)
    amp_dtype = torch.get_autocast_dtype(device_type)

    def caller_autocast() -> contextlib.AbstractContextManager:
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=amp_dtype, enabled=True)

    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        yield caller_autocast


class FlatMap:
    """f on (B, F) rows in the working dtype; counts evaluations."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, caller_autocast):
        self.f, self.shape, self.in_dtype = f, z0.shape, z0.dtype
        self.caller_autocast = caller_autocast
        self.evals = 0

    def __call__(self, z_BF: torch.Tensor) -> torch.Tensor:
        self.evals += 1
        z_in = z_BF.to(self.in_dtype)
        if z_in.dtype != z_BF.dtype:
            # f sees z rounded to the caller's precision: make that the iterate (solvers pass their own
            # buffers), so the residual and the returned z refer to the same point
            z_BF.copy_(z_in)
        with self.caller_autocast():
            fz = self.f(z_in.view(self.shape))
        if fz.shape != self.shape:
            raise ValueError(f"f changed the shape of z: {tuple(self.shape)} -> {tuple(fz.shape)}")
        fz_BF = fz.reshape(z_BF.shape).to(z_BF.dtype)
        if fz_BF.data_ptr() == z_BF.data_ptr():  # f returned its input: solvers update z in place
            fz_BF = fz_BF.clone()
        return fz_BF


class Tracker:
    """Per-sample residuals, lowest-residual iterate, convergence and divergence (see module docstring).

    The per-sample decisions are made on the host: `observe` fetches the two (B,) norms in one transfer, the
    one synchronisation per step that deciding "does any sample go on" needs anyway, and the rest is Python
    arithmetic on B numbers. As tensor operations the same logic is some thirty kernels on (B,) tensors per
    step, each paying a full dispatch right after f has evicted the caches: a large share of a cheap solver's
    overhead (results/bench/README.md has the measured cost and the command that measures it).

    The lowest-residual iterate is kept lazily: a sample whose newest iterate is its best so far (the usual
    case) is only marked, and its row is copied into `best_z_BF` only once a later iterate fails to improve on
    it, or before the rows are read. So a step usually moves no (B, F) data for the record. The price is a
    contract with the solver: the z passed to `observe` must stay unchanged until the next `observe` (solvers
    alternate between two iterate buffers).
    """

    def __init__(self, z0_BF: torch.Tensor, tol: float, stop_mode: str, explode: float):
        B = z0_BF.shape[0]
        self.device, self.dtype = z0_BF.device, z0_BF.dtype
        self.tol, self.rel, self.explode = tol, stop_mode == "rel", explode
        # the kept iterate of every row not marked in `pend`; allocated at the first copy (often never)
        self.best_z_BF: torch.Tensor | None = None
        self.pend_z_BF: torch.Tensor | None = None  # the newest observed iterate
        self.pend = [True] * B  # rows whose kept iterate is pend_z
        # per sample, host floats at the kept iterate: stop-mode residual, abs and rel residual, ||f(z)||
        self.best_res, self.best_abs = [math.inf] * B, [math.inf] * B
        self.best_rel, self.best_fnorm = [math.inf] * B, [math.inf] * B
        self.first_abs: list[float] | None = None  # explode x the first absolute residual
        self.converged = [False] * B
        self.active = [True] * B
        self.all_active = True
        self.active_B1: torch.Tensor | None = None  # device copy of `active`, made when freeze() needs it
        self.flag: float = 0.0  # host copy of the solver's flag passed to observe()
        self.abs_trace: list[list[float]] = []
        self.rel_trace: list[list[float]] = []

    def observe(
        self, z_BF: torch.Tensor, fz_BF: torch.Tensor, g_BF: torch.Tensor, flag: torch.Tensor | None = None
    ) -> None:
        """Record the iterate z with f(z) and g = f(z) - z; z must stay unchanged until the next observe().

        `flag` (a 0-d tensor the solver wants on the host, e.g. "some sample restarted") travels in the same
        transfer and is left in `self.flag`. A non-finite f(z) makes g non-finite too, so testing ||g|| covers
        both."""
        B = len(self.active)
        parts = [torch.linalg.vector_norm(g_BF, dim=1), torch.linalg.vector_norm(fz_BF, dim=1)]
        if flag is not None:
            parts.append(flag.reshape(1).to(g_BF.dtype))
        host = torch.cat(parts).tolist()  # the one host sync of a step
        abs_B, fnorm_B = host[:B], host[B : 2 * B]
        if flag is not None:
            self.flag = host[-1]
        rel_B = [a / (n + _TINY) for a, n in zip(abs_B, fnorm_B)]
        self.abs_trace.append(abs_B)
        self.rel_trace.append(rel_B)
        if self.first_abs is None:
            self.first_abs = [a * self.explode if a == a else math.inf for a in abs_B]
        better = [False] * B
        for b in range(B):
            res = rel_B[b] if self.rel else abs_B[b]
            if res != res:
                res = math.inf
            # frozen rows are re-evaluated at their kept iterate; only active rows may change the record
            if self.active[b] and res < self.best_res[b]:
                better[b] = True
                self.best_res[b], self.best_abs[b] = res, abs_B[b]
                self.best_rel[b], self.best_fnorm[b] = rel_B[b], fnorm_B[b]
            done = self.best_res[b] <= self.tol
            self.converged[b] = self.converged[b] or (self.active[b] and done)
            # a sample stops when converged, non-finite, or exploded past `explode` times its first residual
            go_on = not done and math.isfinite(abs_B[b]) and abs_B[b] <= self.first_abs[b]
            if self.active[b] and not go_on:
                self.active[b], self.active_B1 = False, None
        # rows kept in the previous iterate that z does not improve on are copied out of it now; the first
        # iterate is every row's kept one, whatever its residual
        first = self.pend_z_BF is None and self.best_z_BF is None
        if self.pend_z_BF is not None:
            need = [p and not bt for p, bt in zip(self.pend, better)]
            if any(need):
                self._into_best(need, self.pend_z_BF)
        if not first:
            self.pend = better
        self.pend_z_BF = z_BF
        self.all_active = all(self.active)

    def _mask(self, rows: list[bool]) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)[:, None]

    def _into_best(self, rows: list[bool], src_BF: torch.Tensor) -> None:
        if self.best_z_BF is None:  # rows outside every copy so far are pending: nothing to keep yet
            self.best_z_BF = torch.empty_like(src_BF)
        torch.where(self._mask(rows), src_BF, self.best_z_BF, out=self.best_z_BF)

    def kept(self, final: bool = False) -> torch.Tensor:
        """(B, F) lowest-residual iterate of every sample, made whole in best_z. `final`: the solve is over;
        when every row's kept iterate is the newest one, that buffer itself is returned (no copy)."""
        if self.pend_z_BF is not None:
            if final and self.best_z_BF is None:
                return self.pend_z_BF  # nothing was ever copied, so every row is pending
            if any(self.pend):
                self._into_best(self.pend, self.pend_z_BF)
            self.pend_z_BF, self.pend = None, [False] * len(self.pend)
        assert self.best_z_BF is not None
        return self.best_z_BF

    def freeze(self, z_new_BF: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Next iterate: z_new on active rows, the kept iterate (final or lowest-residual) on the others.

        `inplace`: z_new is the solver's own buffer and may be overwritten.
        """
        if self.all_active:
            return z_new_BF
        if self.active_B1 is None:
            self.active_B1 = self._mask(self.active)
        return torch.where(self.active_B1, z_new_BF, self.kept(), out=z_new_BF if inplace else None)

    def any_active(self) -> bool:
        """Whether any sample still iterates (decided in observe(), no device work)."""
        return any(self.active)

    def result(self, fmap: FlatMap, nstep: int) -> SolverResult:
        abs_tot = math.sqrt(sum(a * a for a in self.best_abs))
        f_tot = math.sqrt(sum(n * n for n in self.best_fnorm))

        def vec(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=self.dtype, device=self.device)

        return SolverResult(
            z=self.kept(final=True).to(fmap.in_dtype).view(fmap.shape),
            nstep=nstep,
            f_evals=fmap.evals,
            abs_res=abs_tot,
            # a sample never seen finite has abs = ||f(z)|| = inf: the batch's rel residual is inf, not NaN
            rel_res=(abs_tot / f_tot if f_tot > 0 else math.inf if abs_tot > 0 else 0.0)
            if math.isfinite(abs_tot) else math.inf,
            abs_res_B=vec(self.best_abs),
            rel_res_B=vec(self.best_rel),
            converged=all(self.converged),
            converged_B=torch.tensor(self.converged, device=self.device),
            abs_trace=vec(self.abs_trace),
            rel_trace=vec(self.rel_trace),
        )


def flatten_start(z0: torch.Tensor) -> torch.Tensor:
    """z0 as a (B, F) matrix in the working dtype (a copy: solvers never write into the caller's tensor)."""
    if z0.dim() == 0:
        raise ValueError("z0 must have a batch dimension (dim 0)")
    if z0.numel() == 0:
        raise ValueError(f"z0 has no elements (shape {tuple(z0.shape)}): nothing to solve")
    return z0.detach().reshape(z0.shape[0], -1).to(working_dtype(z0.dtype), copy=True)
