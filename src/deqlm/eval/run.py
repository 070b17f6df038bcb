"""The torch side of `python -m deqlm.eval`: evaluate the runs its command line found.

`deqlm.eval.cli` parses the command line without torch, then imports this module (so `--help` and usage errors
answer at once); everything the evaluation needs is imported here.
"""

from __future__ import annotations

from pathlib import Path

from deqlm.config import ConfigError
from deqlm.data.errors import DataError
from deqlm.eval.perplexity import evaluate_run
from deqlm.eval.settings import EvalRequest, is_up_to_date, resolve_eval_settings
from deqlm.eval.solver_caps import caps_up_to_date, sweep_solver_caps
from deqlm.infra.exits import BAD_INPUT, FAILED, OK, describe, error, warn
from deqlm.infra.run_folder import RunError, RunFolder


def needs_evaluation(folder: RunFolder, req: EvalRequest) -> bool:
    """True when the run needs evaluating (eval record missing or stale); RunError for a bad run."""
    cfg = folder.config(req.eval_overrides, req.device)
    ckpt_path = folder.find_checkpoint()
    step = folder.recorded_step(ckpt_path)
    if step is None:
        return True
    settings = resolve_eval_settings(cfg).record(req.max_tokens)
    return not is_up_to_date(folder.eval_record(), folder.checkpoint_record(ckpt_path, step), settings,
                             req.splits)


def _exit_code(exc: Exception) -> int:
    """BAD_INPUT for a problem with what was asked (a bad run directory, setting or corpus), as train says it;
    FAILED for a crash inside the model or data code."""
    return BAD_INPUT if isinstance(exc, (RunError, ConfigError, DataError)) else FAILED


def _failure(run: Path, exc: Exception) -> str:
    return str(exc) if isinstance(exc, RunError) else f"{run}: {type(exc).__name__}: {describe(exc)}"


def _evaluate_one(run: Path, req: EvalRequest, *, only_stale: bool) -> bool:
    """The run's eval record, then, when caps are asked and it is a DEQ, its solver-cap record; with
    `only_stale` each only when missing or out of date. False when nothing needed doing. One RunFolder
    serves every step, so each of the run's files is read once."""
    did = False
    folder = RunFolder(run)
    if not only_stale or needs_evaluation(folder, req):
        evaluate_run(folder, req)
        did = True
    if req.solver_caps and not (only_stale and caps_up_to_date(folder, req.solver_caps)):
        if not only_stale or folder.config().model.core == "deq":  # a named unrolled run is an error
            sweep_solver_caps(folder, req)
            did = True
    return did


def evaluate_named(run: Path, req: EvalRequest) -> int:
    """A run named on the command line: always evaluated, and its failure is the command's."""
    try:
        _evaluate_one(run, req, only_stale=False)
    except Exception as exc:  # a crash inside the model or data code too: one line, not a traceback
        return error(_failure(run, exc), _exit_code(exc))
    return OK


def evaluate_all(runs: list[Path], req: EvalRequest) -> int:
    """Every run that needs it (each one with `req.force`); a broken run is a warning and the others go on."""
    n_done = n_fresh = 0
    failed: list[int] = []  # the exit code each skipped run would have had on its own
    for run in runs:
        try:
            if not _evaluate_one(run, req, only_stale=not req.force):
                n_fresh += 1
                print(f"up to date: {run}")
                continue
            n_done += 1
        except Exception as exc:  # one broken run must not stop the others
            failed.append(_exit_code(exc))
            warn(f"{_failure(run, exc)} (skipped)")
    print(f"evaluated {n_done}, up to date {n_fresh}, skipped {len(failed)} of {len(runs)} runs")
    if not failed or n_done or n_fresh:
        return OK
    return failed[0] if len(set(failed)) == 1 else FAILED
