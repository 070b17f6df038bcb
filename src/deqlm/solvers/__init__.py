"""Root solvers for deep equilibrium models: `solver(f, z0, *, max_iter, tol, stop_mode) -> SolverResult`.

`f` maps a tensor batched over dim 0 to a tensor of the same shape; each sample is solved, stopped and
returned independently (see `deqlm.solvers.common`). docs/solvers.md describes the algorithms.

The registry maps a name to a solver. The names the config accepts are `deqlm.choices.SolverName` (torch-free,
for the config and `--help`); the built-in solvers are registered under their function names, and importing
this package checks that the two sets agree.
"""

from collections.abc import Callable

from deqlm.choices import SolverName, check_registry
from deqlm.solvers.anderson import anderson
from deqlm.solvers.broyden import broyden
from deqlm.solvers.fixed_point import fixed_point
from deqlm.solvers.result import SolverResult
from deqlm.solvers.reversible import reversible

Solver = Callable[..., SolverResult]

SOLVERS: dict[str, Solver] = {}


def register_solver(solver: Solver, name: str | None = None) -> Solver:
    """Make `solver` reachable by `get_solver(name)` (default: its function name); returns it unchanged.

    A solver registered after import is reachable by name in code (DEQFixedPoint(f_solver=name)); a config
    accepts it only once its name is added to `deqlm.choices.SolverName`."""
    name = solver.__name__ if name is None else name
    if name in SOLVERS:
        raise ValueError(f"a solver is already registered as {name!r}")
    SOLVERS[name] = solver
    return solver


def get_solver(name: str) -> Solver:
    """The solver registered under `name`; ValueError listing the valid names otherwise."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None


for _solver in (broyden, anderson, fixed_point, reversible):
    register_solver(_solver)
check_registry(SOLVERS, SolverName, "deq.f_solver / deq.b_solver")

__all__ = ["SOLVERS", "Solver", "SolverResult", "anderson", "broyden", "fixed_point", "get_solver",
           "register_solver", "reversible"]
