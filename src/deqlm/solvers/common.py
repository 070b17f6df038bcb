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
from collections.abc import Callable, Iterator

import torch

from deqlm.solvers.result import SolverResult

STOP_MODES = ("abs", "rel")
_TINY = 1e-30  # keeps ||f(z)|| = 0 from dividing by zero in the relative residual


def check_common(max_iter: int, tol: float, stop_mode: str) -> None:
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode={stop_mode!r} is not one of {', '.join(STOP_MODES)}")
    if max_iter < 0:
        raise ValueError(f"max_iter={max_iter!r} must be >= 0")
    if not tol >= 0:
        raise ValueError(f"tol={tol!r} must be >= 0")


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solver arithmetic runs in float64 for float64 inputs and float32 otherwise (never in half
    precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        with self.caller_autocast():
            fz = self.f(z_BF.to(self.in_dtype).view(self.shape))
        if fz.shape != self.shape:
            raise ValueError(f"f changed the shape of z: {tuple(self.shape)} -> {tuple(fz.shape)}")
        fz_BF = fz.reshape(z_BF.shape).to(z_BF.dtype)
        if fz_BF.data_ptr() == z_BF.data_ptr():  # f returned its input: solvers update z in place
            fz_BF = fz_BF.clone()
        return fz_BF


class Tracker:
    """Per-sample residuals, lowest-residual iterate, convergence and divergence (see module docstring).

    The lowest-residual iterate is kept lazily: a sample whose newest iterate is its best so far (the usual
    case) is only marked, and its row is copied into `best_z_BF` only once a later iterate fails to improve on
    it, or before the rows are read. So a step usually moves no (B, F) data for the record, and whether the
    copy is needed reaches the host with the one synchronisation per step that `any_active` already makes.
    The price is a contract with the solver: the z passed to `observe` must stay unchanged until after the
    next `observe` and `any_active` (solvers alternate between two iterate buffers).
    """

    def __init__(self, z0_BF: torch.Tensor, tol: float, stop_mode: str, explode: float):
        B = z0_BF.shape[0]
        dev = z0_BF.device
        self.tol, self.stop_mode, self.explode = tol, stop_mode, explode
        # the kept iterate of every row not marked in pend_B; allocated at the first copy (often never)
        self.best_z_BF: torch.Tensor | None = None
        self.pend_z_BF: torch.Tensor | None = None  # the newest observed iterate
        self.pend_B = torch.ones(B, dtype=torch.bool, device=dev)  # rows whose kept iterate is pend_z
        self.prev_z_BF: torch.Tensor | None = None  # the iterate observed before pend_z ...
        self.need_B = self.pend_B  # ... and its rows still to be copied into best_z (decided on the host)
        # per sample, at the kept iterate: [stop-mode residual, abs residual, rel residual, ||f(z)||]
        self.best_B4 = torch.full((B, 4), float("inf"), dtype=z0_BF.dtype, device=dev)
        self.first_abs_B: torch.Tensor | None = None
        self.converged_B = torch.zeros(B, dtype=torch.bool, device=dev)
        self.active_B = torch.ones(B, dtype=torch.bool, device=dev)
        self.all_active = False  # host copy of active_B.all(), refreshed by any_active()
        self.flag: float = 0.0  # host copy of the solver's flag passed to any_active()
        self.abs_trace: list[torch.Tensor] = []
        self.rel_trace: list[torch.Tensor] = []

    def observe(self, z_BF: torch.Tensor, fz_BF: torch.Tensor, g_BF: torch.Tensor) -> torch.Tensor:
        """Record the iterate z with f(z) and g = f(z) - z; returns the (B,) mask of samples still
        iterating. z must stay unchanged until after the next observe() and any_active().

        Written for few kernel launches (each one costs microseconds on a GPU, as much as a small f): a
        non-finite f(z) makes g non-finite too, so one finiteness test of ||g|| covers both."""
        abs_B = torch.linalg.vector_norm(g_BF, dim=1)
        fnorm_B = torch.linalg.vector_norm(fz_BF, dim=1)
        rel_B = abs_B / (fnorm_B + _TINY)
        self.abs_trace.append(abs_B)
        self.rel_trace.append(rel_B)
        res_B = rel_B if self.stop_mode == "rel" else abs_B
        finite_B = torch.isfinite(abs_B)
        res_B = res_B.nan_to_num(nan=torch.inf, posinf=torch.inf)
        # frozen rows are re-evaluated at their kept iterate; only active rows may change the record
        better_B = self.active_B & (res_B < self.best_B4[:, 0])
        # rows kept in the previous iterate that z does not improve on must be copied out of it; the first
        # iterate is every row's kept one, whatever its residual
        first = self.pend_z_BF is None and self.best_z_BF is None
        self.prev_z_BF, self.need_B = self.pend_z_BF, self.pend_B & ~better_B
        self.pend_z_BF, self.pend_B = z_BF, self.pend_B if first else better_B
        self.best_B4 = torch.where(
            better_B[:, None], torch.stack([res_B, abs_B, rel_B, fnorm_B], 1), self.best_B4
        )
        if self.first_abs_B is None:
            self.first_abs_B = abs_B.nan_to_num(nan=torch.inf) * self.explode
        done_B = self.best_B4[:, 0] <= self.tol
        self.converged_B = self.converged_B | (self.active_B & done_B)
        # a sample stops when converged, non-finite, or exploded past `explode` times its first residual
        go_on_B = ~done_B & finite_B & (abs_B <= self.first_abs_B)
        self.active_B = self.active_B & go_on_B
        return self.active_B

    def _into_best(self, mask_B: torch.Tensor, src_BF: torch.Tensor) -> None:
        if self.best_z_BF is None:  # rows outside every mask so far are pending: nothing to keep yet
            self.best_z_BF = torch.empty_like(src_BF)
        torch.where(mask_B[:, None], src_BF, self.best_z_BF, out=self.best_z_BF)

    def _copy_needed(self) -> None:
        """Copy the rows of the previous iterate still kept into best_z (before the solver overwrites it)."""
        if self.prev_z_BF is not None:
            self._into_best(self.need_B, self.prev_z_BF)
            self.prev_z_BF = None

    def kept(self, final: bool = False) -> torch.Tensor:
        """(B, F) lowest-residual iterate of every sample, made whole in best_z. `final`: the solve is over;
        when every row's kept iterate is the newest one, that buffer itself is returned (no copy)."""
        self._copy_needed()
        if self.pend_z_BF is not None:
            if final and self.best_z_BF is None:
                return self.pend_z_BF  # nothing was ever copied, so every row is pending
            self._into_best(self.pend_B, self.pend_z_BF)
            self.pend_z_BF, self.pend_B = None, torch.zeros_like(self.pend_B)
        assert self.best_z_BF is not None
        return self.best_z_BF

    def freeze(self, z_new_BF: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Next iterate: z_new on active rows, the kept iterate (final or lowest-residual) on the others.

        `inplace`: z_new is the solver's own buffer and may be overwritten.
        """
        if self.all_active:
            return z_new_BF
        return torch.where(
            self.active_B[:, None], z_new_BF, self.kept(), out=z_new_BF if inplace else None
        )

    def any_active(self, flag: torch.Tensor | None = None) -> bool:
        """Whether any sample still iterates. `flag` (a 0-d tensor a solver wants on the host, e.g. "some
        sample restarted") is fetched in the same transfer and left in `self.flag`. After this call the
        solver may overwrite every iterate but the one last observed."""
        parts = [self.active_B.sum(dtype=torch.float32)]
        if flag is not None:
            parts.append(flag.to(torch.float32))
        if self.prev_z_BF is not None:
            parts.append(self.need_B.sum(dtype=torch.float32))
        host = torch.stack(parts).tolist() if len(parts) > 1 else [parts[0].item()]  # the one host sync
        n_active = int(host[0])
        if flag is not None:
            self.flag = host[1]
        if self.prev_z_BF is not None and host[-1] > 0:
            self._copy_needed()
        self.prev_z_BF = None
        self.all_active = n_active == self.active_B.shape[0]
        return n_active > 0

    def result(self, fmap: FlatMap, nstep: int) -> SolverResult:
        abs_tot = float(torch.linalg.vector_norm(self.best_B4[:, 1]))
        f_tot = float(torch.linalg.vector_norm(self.best_B4[:, 3]))
        return SolverResult(
            z=self.kept(final=True).to(fmap.in_dtype).view(fmap.shape),
            nstep=nstep,
            f_evals=fmap.evals,
            abs_res=abs_tot,
            rel_res=abs_tot / f_tot if f_tot > 0 else float("inf") if abs_tot > 0 else 0.0,
            abs_res_B=self.best_B4[:, 1].clone(),
            rel_res_B=self.best_B4[:, 2].clone(),
            converged=bool(self.converged_B.all()),
            converged_B=self.converged_B,
            abs_trace=torch.stack(self.abs_trace),
            rel_trace=torch.stack(self.rel_trace),
        )


def flatten_start(z0: torch.Tensor) -> torch.Tensor:
    """z0 as a (B, F) matrix in the working dtype (a copy: solvers never write into the caller's tensor)."""
    if z0.dim() == 0:
        raise ValueError("z0 must have a batch dimension (dim 0)")
    return z0.detach().reshape(z0.shape[0], -1).to(working_dtype(z0.dtype), copy=True)
