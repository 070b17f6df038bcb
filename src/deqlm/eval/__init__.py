"""Evaluation of trained runs (``eval.json``) and the comparison report (summary tables and plots).

``evaluate_run(run_dir, EvalRequest(...))`` evaluates one run with the Transformer-XL protocol;
``write_report(run_dirs, out_dir, title)`` renders summary.md / summary.csv / PNG plots for a set of runs.
Both raise ``RunError`` (one line: ``<run>: <what>``) for a bad run directory. The loop both the trainer and
``evaluate_run`` use is ``deqlm.eval.loop.evaluate``.
"""

import importlib

from deqlm.eval.runs import RunError, discover_runs
from deqlm.eval.settings import EvalRequest

__all__ = ["EvalRequest", "RunError", "collect_run", "discover_runs", "evaluate_run", "write_report"]

# Looked up on first use (PEP 562): evaluate_run loads torch, which `python -m deqlm.eval --help` must not
# wait for, and `python -m deqlm.eval.report` must not find its module pre-imported.
_LAZY = {"evaluate_run": "perplexity", "write_report": "report", "collect_run": "report"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"deqlm.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'deqlm.eval' has no attribute {name!r}")
