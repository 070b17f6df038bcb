"""Did a DEQ reach its fixed point? The forward solver's figures at evaluation and at the end of training, and
the label a table puts on a DEQ row that stopped short of its equilibrium.

The paper's claim is about the equilibrium z* = f(z*, x). A DEQ whose solves stop at their cap far from it is
a weight-tied network of that many layers trained with an approximate gradient, so its row must say so. The
threshold on the relative residual ||f(z) - z|| / ||f(z)|| is the official code's maintainers' rule of thumb
for good convergence (docs/paper.md §5). Pure functions of the eval record's splits and the training
log's events: the evaluator writes them into the eval record, the report into its tables.
"""

from __future__ import annotations

from deqlm.infra.fmt import as_number, mean_of_known

EQUILIBRIUM_MAX_REL_RES = 0.05  # a DEQ whose mean forward residual at evaluation is above this is not at z*
TRAIN_TAIL_FRACTION = 0.2  # "the end of training": the last 20% of the optimizer steps
AT_EQUILIBRIUM = "at equilibrium"
NOT_AT_EQUILIBRIUM = "not at equilibrium"
FORWARD_KEYS = ("f_nstep", "f_rel_res", "converged_frac")  # the forward solver's mean steps, residual, share


def eval_solver(splits: dict) -> dict:
    """The forward solver's means at evaluation: the test split's, else the validation split's (None when the
    run was evaluated in a mode without a solver)."""
    split = splits.get("test") or splits.get("valid") or {}
    return {k: as_number(split.get(k)) for k in FORWARD_KEYS}


def training_tail(events: list[dict], fraction: float = TRAIN_TAIL_FRACTION) -> dict:
    """The forward solver's means over the training events of the last `fraction` of the steps (DEQ mode
    only; the pretraining stack has no solver). None where no such event logged the figure."""
    logged = [e for e in events if e.get("mode") == "deq" and as_number(e.get("solver/f_nstep")) is not None]
    if not logged:
        return {k: None for k in FORWARD_KEYS}
    last = max(as_number(e.get("step")) or 0.0 for e in events)
    tail = [e for e in logged if (as_number(e.get("step")) or 0.0) >= (1.0 - fraction) * last]
    return {key: mean_of_known(e.get(f"solver/{key}") for e in tail) for key in FORWARD_KEYS}


def equilibrium_label(core: str, at_eval: dict) -> str | None:
    """AT_EQUILIBRIUM or NOT_AT_EQUILIBRIUM for a DEQ evaluated with its solver (`eval_solver`'s figures);
    None for an unrolled run or a DEQ whose evaluation ran no solve (pretrain only, or not evaluated). Solves
    that all diverged leave a step count without a finite residual: not at equilibrium."""
    if core != "deq" or at_eval.get("f_nstep") is None:
        return None
    rel_res = at_eval.get("f_rel_res")
    reached = rel_res is not None and rel_res <= EQUILIBRIUM_MAX_REL_RES
    return AT_EQUILIBRIUM if reached else NOT_AT_EQUILIBRIUM


def convergence_record(core: str, splits: dict, events: list[dict]) -> dict:
    """The eval record's ``convergence`` object: the solver at evaluation and over the end of training, the
    label."""
    at_eval = eval_solver(splits)
    return {
        "eval": at_eval,
        "train_tail": training_tail(events),
        "train_tail_fraction": TRAIN_TAIL_FRACTION,
        "max_rel_res": EQUILIBRIUM_MAX_REL_RES,
        "label": equilibrium_label(core, at_eval),
    }
