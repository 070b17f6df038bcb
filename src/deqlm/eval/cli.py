"""Command line of the evaluator: ``python -m deqlm.eval RUN_DIR|ROOT [split=...] [eval.KEY=VALUE ...]``.

One named run is always evaluated and its failure is the command's; a folder of runs evaluates those lacking
an up-to-date eval record and skips broken ones with a warning. Errors are one line (deqlm.infra.exits).
"""

from __future__ import annotations

import sys
from pathlib import Path

from deqlm.eval.settings import DEFAULT_CAPS, SPLITS, EvalRequest
from deqlm.infra.exits import BAD_INPUT, OK, error
from deqlm.infra.run_folder import CAPS, EVAL, discover_runs, is_run_dir

USAGE = f"""usage: python -m deqlm.eval RUN_DIR|ROOT [split=valid,test] [eval.KEY=VALUE ...]
                        [max_tokens=N] [device=cpu|cuda] [force=true] [caps=default|1,2,4,...]
RUN_DIR: evaluate that run. ROOT (e.g. results/runs): every run below it lacking an up-to-date {EVAL}.
device= stands in for the run's train.device. caps= (DEQ runs): also the test split with the forward
solver capped at each of these steps, at the training tolerance, into {CAPS}
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

    named = len(paths) == 1 and is_run_dir(paths[0])  # one named run: always evaluated, failures are errors
    runs = paths if named else [r for p in paths for r in discover_runs(p)]
    if not runs:
        return error(f"{', '.join(map(str, paths))}: no run directories found", BAD_INPUT)

    # the evaluation loads torch: imported only once the command line is understood, so that --help and
    # usage errors answer at once
    from deqlm.eval import run

    return run.evaluate_named(runs[0], req) if named else run.evaluate_all(runs, req)
