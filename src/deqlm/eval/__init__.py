"""Evaluation of trained runs (``eval.json``) and the comparison report (summary tables and plots).

``evaluate_run(run_dir, EvalRequest(...))`` evaluates one run with the Transformer-XL protocol;
``write_report(run_dirs, out_dir, title)`` renders summary.md / summary.csv / PNG plots for a set of runs.
Both raise ``RunError`` (one line: ``<run>: <what>``) for a bad run directory.
"""

from deqlm.eval.perplexity import EvalRequest, RunError, discover_runs, evaluate_run

__all__ = ["EvalRequest", "RunError", "collect_run", "discover_runs", "evaluate_run", "write_report"]


def __getattr__(name: str):
    # report is imported lazily so that `python -m deqlm.eval.report` does not find it pre-imported
    if name in ("write_report", "collect_run"):
        from deqlm.eval import report

        return getattr(report, name)
    raise AttributeError(f"module 'deqlm.eval' has no attribute {name!r}")
