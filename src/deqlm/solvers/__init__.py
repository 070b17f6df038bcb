"""Root solvers for deep equilibrium models: `solver(f, z0, *, max_iter, tol, stop_mode) -> SolverResult`.

`f` maps a tensor batched over dim 0 to a tensor of the same shape; each sample is solved, stopped and
returned independently (see `deqlm.solvers.common`). docs/solvers.md describes the algorithms.
"""

from collections.abc import Callable

from deqlm.solvers.anderson import anderson
from deqlm.solvers.broyden import broyden
from deqlm.solvers.fixed_point import fixed_point
from deqlm.solvers.result import SolverResult

SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "broyden": broyden,
    "anderson": anderson,
    "fixed_point": fixed_point,
}


def get_solver(name: str) -> Callable[..., SolverResult]:
    """The solver registered under `name`; ValueError listing the valid names otherwise."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None


__all__ = ["SOLVERS", "SolverResult", "anderson", "broyden", "fixed_point", "get_solver"]
