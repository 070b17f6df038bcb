"""Evaluation of trained runs (their eval records) and the comparison report (summary tables and plots).

``perplexity.evaluate_run(run_dir, settings.EvalRequest(...))`` evaluates one run with the Transformer-XL
protocol; ``report.write_report(run_dirs, out_dir, title)`` renders summary.md / summary.csv / PNG plots for
a set of runs. Both raise ``deqlm.infra.run_folder.RunError`` (one line: ``<run>: <what>``) for a bad run
folder. The loop both the trainer and ``evaluate_run`` use is ``deqlm.eval.loop.evaluate``.

`cli.py` parses `python -m deqlm.eval` without torch and `run.py` does the evaluating (the one module the
command line imports once it is understood). Import names from their modules: this package re-exports
nothing, so importing it loads nothing (and `python -m deqlm.eval.report` does not find its module loaded).
"""
