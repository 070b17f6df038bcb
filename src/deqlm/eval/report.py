"""Comparison report: one row per run, DEQ runs paired with their unrolled baselines, training-curve plots.

Reads each run's config, training log and eval record through its `RunFolder` (never a checkpoint) and writes
``summary.md``, ``summary.csv`` and PNG plots. The command line groups runs by corpus:

    python -m deqlm.eval.report [RUNS ...] [--out DIR] [--title TEXT]  ->  DIR/<corpus>/summary.md

DIR defaults to ``results/compare`` (ignored by git), so comparing one's own runs never rewrites the committed
reproduction under ``results/<corpus>/``; regenerating that is the explicit ``--out results`` of
results/README.md.

Test and validation figures come from the eval record (whole split, Transformer-XL protocol); the training
log's last validation figure is shown only as ``last_logged_valid_ppl``. Pairing rules are in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from deqlm.config import ExperimentConfig
from deqlm.eval.convergence import equilibrium_label, eval_solver, training_tail
from deqlm.eval.pairing import pair_runs, pretrain_only, seed_means
from deqlm.eval.plots import (
    log_values,
    plot_curves,
    plot_gap_by_residual,
    plot_gap_by_width,
    plot_memory,
    plot_solver,
    plot_solver_caps,
    plot_tradeoff,
    run_styles,
)
from deqlm.eval.tables import csv_text, render_markdown
from deqlm.infra.allocator import tune_allocator
from deqlm.infra.exits import BAD_INPUT, OK, error, warn
from deqlm.infra.io import JsonlError, atomic_write_text
from deqlm.infra.run_folder import (
    CODE_NOT_RECORDED,
    EVAL,
    METRICS,
    RunError,
    RunFolder,
    discover_runs,
    is_run_dir,
)

COLUMNS = [
    "run", "code", "experiment", "corpus", "arch", "core", "mode", "pair", "seed", "steps", "params_total",
    "params_nonembedding",
    "valid_ppl", "test_ppl", "valid_loss", "test_loss", "test_word_ppl", "best_possible_ppl", "paper_test",
    "paper_row", "last_logged_valid_ppl", "peak_train_mem_gib", "peak_mem_kind", "activation_bytes",
    "state_bytes", "model_mem_mib",
    "tokens_per_s", "eval_tokens_per_s", "f_nstep_mean", "f_rel_res_mean", "b_nstep_mean",
    "converged_frac_mean", "eval_f_nstep", "eval_f_rel_res", "eval_converged_frac", "tail_f_nstep",
    "tail_f_rel_res", "tail_converged_frac", "equilibrium", "train_time_s", "eval_step", "eval_batch_size",
    "eval_tgt_len", "eval_mem_len",
    "eval_clamp_len", "eval_f_max_iter", "eval_f_tol", "eval_partial", "paired_with", "mem_ratio", "ppl_gap",
]  # fmt: skip
DEFAULT_OUT = "results/compare"  # a user's comparisons; the committed results/<corpus>/ only on request
PAIR_COLUMNS = [
    "pair", "seed", "deq_experiment", "unrolled_experiment", "arch", "width", "train_tokens", "deq_run",
    "deq_code", "unrolled_run", "unrolled_code", "deq_test", "unrolled_test", "ppl_gap", "gap_pct",
    "deq_mem_gib", "unrolled_mem_gib", "mem_ratio", "model_mem_ratio", "deq_params_nonembedding",
    "unrolled_params_nonembedding", "speed_ratio", "deq_eval_f_nstep", "deq_eval_f_rel_res",
    "deq_eval_converged_frac", "deq_tail_f_nstep", "deq_tail_f_rel_res", "deq_tail_converged_frac",
    "deq_equilibrium", "notes",
]  # fmt: skip
MEAN_COLUMNS = [
    "pair", "deq_experiment", "unrolled_experiment", "width", "train_tokens", "n_seeds", "seeds",
    "deq_test_mean", "unrolled_test_mean", "gap_pct_mean", "gap_pct_sd", "gap_pct_min", "gap_pct_max",
    "deq_at_equilibrium",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# reading one run


def read_metrics(folder: RunFolder) -> list[dict]:
    """The training log as a list of flat dicts (a torn last line is dropped: the trainer may be
    mid-write); a missing log or any other bad line makes the run bad."""
    if not folder.has_metrics():
        raise RunError(folder.path, f"missing {METRICS}")
    try:
        return folder.metrics()
    except JsonlError as exc:
        raise RunError(folder.path, f"corrupt {METRICS} ({exc.what})") from None


def _agg(values: list[float], how) -> float | None:
    return how(values) if values else None


def _int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def summarize_run(run_dir: Path, cfg: ExperimentConfig, events: list[dict], ev: dict | None,
                  code: str = CODE_NOT_RECORDED) -> dict:
    """One report row (keys: COLUMNS) from the config, the training log, the eval record and the run's
    `code` label (`RunFolder.code`)."""
    ev = ev or {}
    settings = ev.get("settings") or {}
    splits = ev.get("splits") or {}
    deq_events = [e for e in events if e.get("mode", "deq") == "deq"]
    # a DEQ run's activation figure is its DEQ mode's, not the shallow pretraining stack's that precedes it
    own_events = [e for e in events if e.get("mode") != "pretrain"] if cfg.model.core == "deq" else events
    logged_mode = next((e["mode"] for e in reversed(events) if "mode" in e), None)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(
        run="/".join(run_dir.resolve().parts[-3:]),
        experiment=cfg.name,
        corpus=cfg.data.dataset,
        arch=cfg.model.arch,
        core=cfg.model.core,
        # the mode the evaluated weights ran in: "pretrain" marks a DEQ run that never left its pretraining
        mode=ev.get("mode") or logged_mode,
        pair=cfg.pair or None,
        seed=cfg.train.seed,
        steps=_int(_agg(log_values(events, "step"), max)),
        params_total=ev.get("params_total"),
        params_nonembedding=ev.get("params_nonembedding"),
        valid_ppl=ev.get("valid_ppl"),
        test_ppl=ev.get("test_ppl"),
        valid_loss=ev.get("valid_loss"),
        test_loss=ev.get("test_loss"),
        test_word_ppl=ev.get("test_word_ppl"),
        best_possible_ppl=ev.get("best_possible_ppl"),
        paper_test=cfg.paper_test,
        paper_row=cfg.paper_row or None,
        last_logged_valid_ppl=(log_values(events, "valid/ppl") or [None])[-1],
        peak_train_mem_gib=_agg(log_values(events, "mem/peak_gib"), max),
        peak_mem_kind=next((e["mem/peak_kind"] for e in reversed(events) if "mem/peak_kind" in e), None),
        activation_bytes=_int(_agg(log_values(own_events or events, "mem/activation_bytes"), max)),
        state_bytes=_int(_agg(log_values(events, "mem/state_bytes"), max)),
        tokens_per_s=_agg(log_values(events, "speed/tokens_per_s"), statistics.median),
        eval_tokens_per_s=(splits.get("test") or splits.get("valid") or {}).get("tokens_per_s"),
        f_nstep_mean=_agg(log_values(deq_events, "solver/f_nstep"), statistics.fmean),
        f_rel_res_mean=_agg(log_values(deq_events, "solver/f_rel_res"), statistics.fmean),
        b_nstep_mean=_agg(log_values(deq_events, "solver/b_nstep"), statistics.fmean),
        converged_frac_mean=_agg(log_values(deq_events, "solver/converged_frac"), statistics.fmean),
        train_time_s=_agg(log_values(events, "time/elapsed_s"), max),
        eval_step=(ev.get("checkpoint") or {}).get("step"),
        eval_batch_size=settings.get("batch_size"),
        eval_tgt_len=settings.get("tgt_len"),
        eval_mem_len=settings.get("mem_len"),
        eval_clamp_len=settings.get("clamp_len"),
        eval_f_max_iter=settings.get("f_max_iter"),
        eval_f_tol=settings.get("f_tol"),
        eval_partial=ev.get("partial") if ev else None,
    )
    row.update(code=code, **convergence_columns(cfg.model.core, splits, events))
    if row["activation_bytes"] is not None and row["state_bytes"] is not None:
        row["model_mem_mib"] = (row["activation_bytes"] + row["state_bytes"]) / 2**20
    return row


def convergence_columns(core: str, splits: dict, events: list[dict]) -> dict:
    """A row's equilibrium columns: the forward solver at evaluation and over the end of training, the
    label."""
    at_eval, tail = eval_solver(splits), training_tail(events)
    return {**{f"eval_{k}": v for k, v in at_eval.items()}, **{f"tail_{k}": v for k, v in tail.items()},
            "equilibrium": equilibrium_label(core, at_eval)}


def collect_run(run: str | Path | RunFolder) -> dict:
    """``{"dir", "cfg", "events", "eval", "row", "warnings", "caps"}`` of one run (caps: its solver-cap
    record or None); RunError when it is unusable."""
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    run_dir = folder.path
    if not run_dir.is_dir():
        raise RunError(run_dir, "no such directory")
    cfg = folder.config()
    events = read_metrics(folder)
    ev = folder.eval_record()
    warnings = []
    if ev is None and not folder.has_checkpoint():
        raise RunError(run_dir, f"no checkpoint and no {EVAL}")
    if ev is None:
        warnings.append(
            f"warning: {run_dir}: no {EVAL}, test figures left blank (run `make eval RUN={run_dir}`)"
        )
    elif ev.get("partial"):
        warnings.append(
            f"warning: {run_dir}: {EVAL} was made with max_tokens={ev['settings']['max_tokens']}"
        )
    row = summarize_run(run_dir, cfg, events, ev, folder.code())
    if pretrain_only(row):
        warnings.append(
            f"warning: {run_dir}: a DEQ run that never left its pretraining (model.pretrain_steps "
            f"{cfg.model.pretrain_steps} >= the evaluated step {row['eval_step'] or row['steps']}): its "
            f"figures are the unrolled pretraining stack's, so it is labelled pretrain only and not paired"
        )
    return {"dir": run_dir, "cfg": cfg, "events": events, "eval": ev, "row": row, "warnings": warnings,
            "caps": folder.solver_caps()}


# ------------------------------------------------------------------------------------------------
# entry points


def write_report(run_dirs, out_dir, title: str, *, skip_bad: bool = False, log=print) -> list[dict]:
    """Render summary.md, summary.csv and plots for ``run_dirs`` into ``out_dir``; returns the rows.

    A bad run raises RunError, or with ``skip_bad`` is left out with a ``warning:`` line passed to ``log``.
    """
    out_dir = Path(out_dir)
    runs, warnings = [], []
    for run_dir in run_dirs:
        try:
            run = collect_run(run_dir)
        except RunError as exc:
            if not skip_bad:
                raise
            warnings.append(f"warning: {exc} (skipped)")
            log(warnings[-1])
            continue
        for w in run["warnings"]:
            log(w)
        warnings += run["warnings"]
        runs.append(run)
    runs.sort(
        key=lambda r: (r["row"]["pair"] or "~", r["row"]["core"], r["row"]["experiment"], r["dir"].name)
    )
    pairs = pair_runs(runs)
    means = seed_means(pairs)
    rows = [r["row"] for r in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if runs:
        import matplotlib

        matplotlib.use("Agg")
        style = run_styles(runs)  # one colour and label per run across every figure
        for name, fn in (
            ("perplexity.png", plot_curves),
            ("memory.png", plot_memory),
            ("solver.png", plot_solver),
            ("tradeoff.png", plot_tradeoff),
            ("solver_caps.png", plot_solver_caps),
        ):
            if fn(runs, out_dir / name, title, style):
                plots.append(name)
        if plot_gap_by_width(means, out_dir / "gap_by_width.png", title):
            plots.append("gap_by_width.png")
        if plot_gap_by_residual(pairs, out_dir / "gap_by_residual.png", title):
            plots.append("gap_by_residual.png")
    atomic_write_text(out_dir / "summary.csv", csv_text(rows, COLUMNS))
    if pairs:
        atomic_write_text(out_dir / "pairs.csv", csv_text(pairs, PAIR_COLUMNS))
        atomic_write_text(out_dir / "pair_means.csv", csv_text(means, MEAN_COLUMNS))
    atomic_write_text(out_dir / "summary.md", render_markdown(title, rows, pairs, means, plots, warnings))
    log(f"wrote {out_dir / 'summary.md'} ({len(rows)} runs, {len(pairs)} pairs, {len(plots)} plots)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deqlm.eval.report",
        description="Summary tables and plots per corpus under OUT/<corpus>/.",
    )
    parser.add_argument(
        "runs", nargs="*", default=["results/runs"], help="run directories or folders of runs"
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT,
        help=f"output root (default: {DEFAULT_OUT}; `--out results` regenerates the committed results)",
    )
    parser.add_argument("--title", default="", help="report title (default: '<corpus>: DEQ vs unrolled')")
    args = parser.parse_args(argv)

    paths = [Path(p) for p in args.runs]
    for p in paths:
        if not p.exists():
            return error(f"{p}: no such directory", BAD_INPUT)
    single = len(paths) == 1 and is_run_dir(paths[0])
    run_dirs = [r for p in paths for r in discover_runs(p)]
    if not run_dirs:
        return error(f"{', '.join(map(str, paths))}: no run directories found", BAD_INPUT)
    by_corpus: dict[str, list[RunFolder]] = defaultdict(list)
    n_bad = 0
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        try:
            by_corpus[folder.config().data.dataset].append(folder)
        except RunError as exc:
            if single:
                return error(str(exc), BAD_INPUT)
            n_bad += 1
            warn(f"{exc} (skipped)")
    for corpus, dirs in sorted(by_corpus.items()):
        title = args.title or f"{corpus}: DEQ vs unrolled"

        def log(msg: str) -> None:
            print(msg, file=sys.stderr if msg.startswith(("warning", "error")) else sys.stdout)

        try:
            rows = write_report(dirs, Path(args.out) / corpus, title, skip_bad=not single, log=log)
        except RunError as exc:
            return error(str(exc), BAD_INPUT)
        n_bad += len(dirs) - len(rows)
    return BAD_INPUT if n_bad == len(run_dirs) else OK


if __name__ == "__main__":
    tune_allocator()
    raise SystemExit(main())
