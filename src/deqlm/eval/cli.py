"""Command line of the evaluator: ``python -m deqlm.eval RUN_DIR|ROOT [split=...] [eval.KEY=VALUE ...]``.

One named run is always evaluated and its failure is the command's; a folder of runs evaluates those lacking
an up-to-date ``eval.json`` and skips broken ones with a warning. Errors are one line (deqlm.exits).
"""

from __future__ import annotations

import sys
from pathlib import Path

from deqlm.config import ConfigError
from deqlm.data.errors import DataError
from deqlm.eval.runs import (
    RunError,
    caps_up_to_date,
    checkpoint_id,
    discover_runs,
    find_checkpoint,
    is_run_dir,
    is_up_to_date,
    load_run_config,
    read_eval_json,
    recorded_step,
)
from deqlm.eval.settings import DEFAULT_CAPS, SPLITS, EvalRequest, resolve_eval_settings
from deqlm.exits import BAD_INPUT, FAILED, OK, describe, error, warn

USAGE = """usage: python -m deqlm.eval RUN_DIR|ROOT [split=valid,test] [eval.KEY=VALUE ...]
                        [max_tokens=N] [device=cpu|cuda] [force=true] [caps=default|1,2,4,...]
RUN_DIR: evaluate that run. ROOT (e.g. results/runs): every run below it lacking an up-to-date eval.json.
device= stands in for the run's train.device. caps= (DEQ runs): also the test split with the forward
solver capped at each of these steps, at the training tolerance, into solver_caps.json
(default: 1,2,4,8,12,16,30)."""


def _parse_option(req: EvalRequest, arg: str, key: str, value: str) -> None:
    """Apply one ``key=value`` argument that is not an ``eval.*`` override; ValueError when it is bad."""
    if key in ("split", "splits"):
        chosen = tuple(s for s in value.split(",") if s)
        bad = [s for s in chosen if s not in SPLITS]
        if bad or not chosen:
            raise ValueError(f"split={value!r}: choose from {', '.join(SPLITS)} (comma-separated)")
        req.splits = chosen
    elif key == "max_tokens":
        if not value.isdigit():
            raise ValueError(f"max_tokens={value!r} must be a non-negative integer")
        req.max_tokens = int(value)
    elif key == "device":
        req.device = value
    elif key == "force":
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"force={value!r} must be true or false")
        req.force = value.lower() in ("true", "1")
    elif key == "caps":
        req.solver_caps = _parse_caps(value)
    elif "." in key:
        raise ValueError(f"{arg!r}: only eval.* settings can be changed at evaluation time")
    else:
        raise ValueError(
            f"unknown argument {arg!r} (expected split=, max_tokens=, device=, force=, caps= or eval.*=)"
        )


def _parse_caps(value: str) -> tuple[int, ...]:
    if value == "default":
        return DEFAULT_CAPS
    caps = tuple(c for c in value.split(",") if c)
    if not caps or not all(c.isdigit() and int(c) > 0 for c in caps):
        raise ValueError(f"caps={value!r} must be 'default' or positive integers, comma-separated")
    return tuple(sorted({int(c) for c in caps}))


def parse_args(argv: list[str]) -> tuple[list[Path], EvalRequest]:
    paths: list[Path] = []
    overrides: list[str] = []
    req = EvalRequest()
    for arg in argv:
        if "=" not in arg:
            paths.append(Path(arg))
            continue
        key, value = arg.split("=", 1)
        if key.startswith("eval."):
            overrides.append(arg)
        else:
            _parse_option(req, arg, key, value)
    if not paths:
        raise ValueError("give a run directory or a folder of runs (e.g. results/runs)")
    req.eval_overrides = tuple(overrides)
    return paths, req


def needs_evaluation(run_dir: Path, req: EvalRequest) -> bool:
    """True when the run needs evaluating (eval.json missing or stale); RunError for a bad run."""
    cfg = load_run_config(run_dir, req.eval_overrides, req.device)
    ckpt_path = find_checkpoint(run_dir)
    existing = read_eval_json(run_dir)
    step = recorded_step(existing, ckpt_path, run_dir)
    if step is None:
        return True
    settings = resolve_eval_settings(cfg).record(req.max_tokens)
    return not is_up_to_date(existing, checkpoint_id(run_dir, ckpt_path, step), settings, req.splits)


def _exit_code(exc: Exception) -> int:
    """BAD_INPUT for a problem with what was asked (a bad run directory, setting or corpus), as train says it;
    FAILED for a crash inside the model or data code."""
    return BAD_INPUT if isinstance(exc, (RunError, ConfigError, DataError)) else FAILED


def _failure(run: Path, exc: Exception) -> str:
    return str(exc) if isinstance(exc, RunError) else f"{run}: {type(exc).__name__}: {describe(exc)}"


def _evaluate_one(run: Path, req: EvalRequest, steps: tuple, *, only_stale: bool) -> bool:
    """The run's eval.json, then, when caps are asked and it is a DEQ, its solver_caps.json; with `only_stale`
    each only when missing or out of date. False when nothing needed doing."""
    evaluate_run, sweep_solver_caps = steps
    did = False
    if not only_stale or needs_evaluation(run, req):
        evaluate_run(run, req)
        did = True
    if req.solver_caps and not (only_stale and caps_up_to_date(run, req.solver_caps)):
        if not only_stale or load_run_config(run).model.core == "deq":  # a named explicit run is an error
            sweep_solver_caps(run, req)
            did = True
    return did


def _evaluate_all(runs: list[Path], req: EvalRequest, steps: tuple) -> int:
    """Every run that needs it; one broken run is a warning and the others go on."""
    n_done = n_fresh = 0
    failed: list[int] = []  # the exit code each skipped run would have had on its own
    for run in runs:
        try:
            if not _evaluate_one(run, req, steps, only_stale=not req.force):
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return OK
    try:
        paths, req = parse_args(argv)
    except ValueError as exc:
        return error(str(exc), BAD_INPUT)
    missing = [p for p in paths if not p.exists()]
    if missing:
        return error(f"{missing[0]}: no such directory", BAD_INPUT)

    # the evaluation loads torch: imported only once the command line is understood, so that --help and
    # usage errors answer at once
    from deqlm.eval.perplexity import evaluate_run
    from deqlm.eval.solver_caps import sweep_solver_caps

    steps = (evaluate_run, sweep_solver_caps)
    if len(paths) == 1 and is_run_dir(paths[0]):  # one named run: always evaluate, failures are errors
        try:
            _evaluate_one(paths[0], req, steps, only_stale=False)
        except Exception as exc:  # a crash inside the model or data code too: one line, not a traceback
            return error(_failure(paths[0], exc), _exit_code(exc))
        return OK
    runs = [r for p in paths for r in discover_runs(p)]
    if not runs:
        return error(f"{', '.join(map(str, paths))}: no run directories found", BAD_INPUT)
    return _evaluate_all(runs, req, steps)
