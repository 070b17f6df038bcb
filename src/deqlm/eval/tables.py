"""The comparison report's tables: summary.md's markdown and the CSV files, from the rows `deqlm.eval.report`
and `deqlm.eval.pairing` build. Column meanings are in docs/evaluation.md.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from pathlib import Path
from typing import Any

from deqlm.eval.convergence import EQUILIBRIUM_MAX_REL_RES, NOT_AT_EQUILIBRIUM
from deqlm.eval.pairing import pretrain_only
from deqlm.infra.fmt import number
from deqlm.infra.run_folder import ENV, EVAL, METRICS


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(number(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def core_cell(row: dict) -> str:
    """The core as a table shows it: a DEQ that never left its pretraining, or that stopped short of its fixed
    point, says so where its figures are read."""
    if pretrain_only(row):
        return "deq (pretrain only)"
    if row.get("equilibrium") == NOT_AT_EQUILIBRIUM:
        return f"deq ({NOT_AT_EQUILIBRIUM})"
    return row["core"]


def _runs_table(rows: list[dict], metric: str, copy_task: bool) -> str:
    per_word = any(r["test_word_ppl"] is not None for r in rows)  # subword runs: ppl per token above
    header = (["run", "code", "core", "pair", "seed", "params (non-emb)", f"valid {metric}", f"test {metric}"]
              + (["test ppl per word"] if per_word else []) + ([] if copy_task else ["best possible ppl"])
              + ["paper test", "peak train mem (GiB)", "model mem (MiB)", "train tok/s",
                 "solver steps (eval)", "rel. residual (eval)", "converged (eval)",
                 "rel. residual (last 20% of training)", "eval tgt/mem/f_max_iter"])  # fmt: skip
    body = [
        [r["run"], r["code"], core_cell(r), r["pair"], r["seed"], r["params_nonembedding"],
         r[f"valid_{metric}"], r[f"test_{metric}"]]
        + ([r["test_word_ppl"]] if per_word else []) + ([] if copy_task else [r["best_possible_ppl"]])
        + [r["paper_test"], r["peak_train_mem_gib"], r["model_mem_mib"], r["tokens_per_s"], r["eval_f_nstep"],
           r["eval_f_rel_res"], r["eval_converged_frac"], r["tail_f_rel_res"],
           "/".join(number(r[k]) for k in ("eval_tgt_len", "eval_mem_len", "eval_f_max_iter"))]
        for r in rows
    ]  # fmt: skip
    return md_table(header, body)


def _pairs_section(pairs: list[dict], metric: str, per_word: bool) -> list[str]:
    if not pairs:
        return []
    header = ["pair", "seed", "DEQ run", "DEQ code", "unrolled run", "unrolled code", f"DEQ {metric}",
              f"unrolled {metric}", "gap %", "DEQ rel. residual (eval)", "DEQ converged (eval)", "DEQ at z*",
              "memory ratio", "model memory ratio", "speed ratio", "notes"]  # fmt: skip
    body = [
        [p["pair"], p["seed"], p["deq_run"], p["deq_code"], p["unrolled_run"], p["unrolled_code"],
         p["deq_test"], p["unrolled_test"], p["gap_pct"], p["deq_eval_f_rel_res"],
         p["deq_eval_converged_frac"], p["deq_equilibrium"], p["mem_ratio"], p["model_mem_ratio"],
         p["speed_ratio"], p["notes"]]
        for p in pairs
    ]  # fmt: skip
    return [
        "## DEQ vs unrolled baseline",
        "",
        f"gap % = 100 (DEQ / unrolled - 1) on test {metric} (negative: DEQ better); DEQ at z* = whether "
        f"the DEQ's mean forward relative residual at evaluation is at most {EQUILIBRIUM_MAX_REL_RES} (a "
        f"DEQ that is not is a capped weight-tied stack, not an equilibrium model); memory ratio = DEQ / "
        f"unrolled peak training memory, model memory ratio = the same for the model's own tensors "
        f"(model_mem_mib); speed ratio = unrolled / DEQ training tokens/s (>1: DEQ slower). Every column is "
        f"in `pairs.csv`."
        + (" Subword runs are compared on their perplexity per word." if per_word else ""),
        "",
        md_table(header, body),
        "",
    ]


def spread_cell(mean: float | None, lo: float | None, hi: float | None) -> str:
    """A seed study's figure as it is quoted: the mean, then the range over seeds."""
    if mean is None:
        return number(None)
    return f"{mean:+.1f} ({lo:+.1f} to {hi:+.1f})"


def _means_section(means: list[dict], metric: str) -> list[str]:
    if not means:
        return []
    header = ["pair", "DEQ", "unrolled", "width", "train tokens", "seeds", f"DEQ {metric} (mean)",
              f"unrolled {metric} (mean)", "gap % mean (min to max)", "gap % sd",
              "DEQ at z* (seeds)"]  # fmt: skip
    body = [
        [m["pair"], m["deq_experiment"], m["unrolled_experiment"], m["width"], m["train_tokens"], m["seeds"],
         m["deq_test_mean"],
         m["unrolled_test_mean"], spread_cell(m["gap_pct_mean"], m["gap_pct_min"], m["gap_pct_max"]),
         m["gap_pct_sd"], m["deq_at_equilibrium"]]
        for m in means
    ]  # fmt: skip
    return ["## Over seeds", "",
            "Each DEQ experiment against its baseline at one width and budget, paired seed by seed "
            "(`pair_means.csv`): the figure to quote is the mean gap with its range, never one seed's.", "",
            md_table(header, body), ""]


def render_markdown(title: str, rows: list[dict], pairs: list[dict], means: list[dict], plots: list[str],
                    warnings: list[str]) -> str:
    copy_task = bool(rows) and all(r["corpus"] == "copy" for r in rows)
    metric = "loss" if copy_task else "ppl"
    per_word = any(r["test_word_ppl"] is not None for r in rows)
    partial = [r["run"] for r in rows if r["eval_partial"]]
    extent = "whole split" if not partial else f"whole split, except partial evals of {', '.join(partial)}"
    out = [
        f"# {title}",
        "",
        f"Generated {_dt.date.today().isoformat()} by `python -m deqlm.eval.report` from {len(rows)} run(s). "
        f"Valid/test figures come from each run's `{EVAL}` ({extent}; Transformer-XL protocol, memory "
        f"carried across segments); memory, speed and training-solver figures from `{METRICS}`; `code` "
        f"from `{ENV}`. Columns are described in docs/evaluation.md; every column is in `summary.csv`.",
        "",
        "## Runs",
        "",
        _runs_table(rows, metric, copy_task),
        "",
    ]
    out += _pairs_section(pairs, metric, per_word) + _means_section(means, metric)
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    if warnings:
        out += ["## Warnings", ""] + [f"- {w.removeprefix('warning: ')}" for w in warnings] + [""]
    return "\n".join(out)
