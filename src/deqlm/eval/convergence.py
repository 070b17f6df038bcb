"""Did a DEQ reach its fixed point? The forward solver's figures at evaluation and at the end of training, and
the label a table puts on a DEQ row that stopped short of its equilibrium.

The paper's claim is about the equilibrium z* = f(z*, x). A DEQ whose solves stop at their cap far from it is
a weight-tied network of that many layers trained with an approximate gradient, so its row must say so. The
threshold on the relative residual ||f(z) - z|| / ||f(z)|| is the official code's maintainers' rule of thumb
for good convergence (docs/paper.md, "Convergence"). Pure functions of eval.json splits and metrics.jsonl
events: the evaluator writes them into eval.json, the report into its tables.
"""

from __future__ import annotations

import statistics

EQUILIBRIUM_MAX_REL_RES = 0.05  # a DEQ whose mean forward residual at evaluation is above this is not at z*
TRAIN_TAIL_FRACTION = 0.2  # "the end of training": the last 20% of the optimizer steps
AT_EQUILIBRIUM = "at equilibrium"
NOT_AT_EQUILIBRIUM = "not at equilibrium"
SOLVER_KEYS = ("f_nstep", "f_rel_res", "converged_frac")  # forward solver: mean steps, residual, converged


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def eval_solver(splits: dict) -> dict:
    """The forward solver's means at evaluation: the test split's, else the validation split's (None when the
    run was evaluated in a mode without a solver)."""
    split = splits.get("test") or splits.get("valid") or {}
    return {k: _finite(split.get(k)) for k in SOLVER_KEYS}


def training_tail(events: list[dict], fraction: float = TRAIN_TAIL_FRACTION) -> dict:
    """The forward solver's means over the training events of the last `fraction` of the steps (DEQ mode
    only; the pretraining stack has no solver). None where no such event logged the figure."""
    logged = [e for e in events if e.get("mode") == "deq" and _finite(e.get("solver/f_nstep")) is not None]
    if not logged:
        return {k: None for k in SOLVER_KEYS}
    last = max(_finite(e.get("step")) or 0.0 for e in events)
    tail = [e for e in logged if (_finite(e.get("step")) or 0.0) >= (1.0 - fraction) * last]
    out = {}
    for key in SOLVER_KEYS:
        values = [v for v in (_finite(e.get(f"solver/{key}")) for e in tail) if v is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def equilibrium_label(core: str, eval_rel_res: float | None) -> str | None:
    """AT_EQUILIBRIUM or NOT_AT_EQUILIBRIUM for a DEQ evaluated with its solver, None otherwise (an unrolled
    run, or a DEQ without a residual at evaluation)."""
    if core != "deq" or eval_rel_res is None:
        return None
    return AT_EQUILIBRIUM if eval_rel_res <= EQUILIBRIUM_MAX_REL_RES else NOT_AT_EQUILIBRIUM


def convergence_record(core: str, splits: dict, events: list[dict]) -> dict:
    """eval.json's ``convergence`` object: the solver at evaluation and over the end of training, the
    label."""
    at_eval = eval_solver(splits)
    return {
        "eval": at_eval,
        "train_tail": training_tail(events),
        "train_tail_fraction": TRAIN_TAIL_FRACTION,
        "max_rel_res": EQUILIBRIUM_MAX_REL_RES,
        "label": equilibrium_label(core, at_eval["f_rel_res"]),
    }
