"""Plain fixed-point (Picard) iteration z <- f(z) with per-sample stopping: the baseline to beat."""

# B: batch, F: flattened state size per sample

from __future__ import annotations

from collections.abc import Callable

import torch

from deqlm.solvers.common import FlatMap, Tracker, check_common, flatten_start, solver_mode
from deqlm.solvers.result import SolverResult


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 30,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    explode: float = 1e3,
) -> SolverResult:
    """Iterate z_{k+1} = f(z_k) from z0 for at most `max_iter` steps (`max_iter + 1` evaluations of f).

    A sample stops when its residual (||f(z) - z||, divided by ||f(z)|| in `rel` mode) is <= tol, or when its
    absolute residual becomes non-finite or exceeds `explode` times the first one. Returns, per sample, the
    lowest-residual iterate. Runs without an autograd graph.
    """
    check_common(max_iter, tol, stop_mode, explode)
    with solver_mode(z0.device.type) as caller_autocast:
        fmap = FlatMap(f, z0, caller_autocast)
        z_BF = flatten_start(z0)
        track = Tracker(z_BF, tol, stop_mode, explode)
        fz_BF = fmap(z_BF)
        track.observe(z_BF, fz_BF, fz_BF - z_BF)
        nstep = 0
        while nstep < max_iter and track.any_active():
            z_BF = track.freeze(fz_BF)
            del fz_BF  # now z (or copied into it): one vector less while f runs
            fz_BF = fmap(z_BF)
            nstep += 1
            # the residual is a temporary of the stopping test: nothing of it is live while f runs
            track.observe(z_BF, fz_BF, fz_BF - z_BF)
        return track.result(fmap, nstep)
