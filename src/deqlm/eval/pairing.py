"""Pairing for the comparison report: which DEQ run is compared with which unrolled baseline, on what.

The rules are written out in docs/evaluation.md ("Pairing rules").
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from deqlm.config import ExperimentConfig
from deqlm.eval.convergence import AT_EQUILIBRIUM, FORWARD_KEYS
from deqlm.infra.fmt import mean_of_known

# the DEQ's convergence as its row has it, repeated in the pair table
CONVERGENCE_KEYS = (*(f"eval_{k}" for k in FORWARD_KEYS), *(f"tail_{k}" for k in FORWARD_KEYS), "equilibrium")


def pretrain_only(row: dict) -> bool:
    """A DEQ run whose evaluated weights only ever ran the shallow pretraining stack, never the solver."""
    return row["core"] == "deq" and row["mode"] == "pretrain"


def _headline(row: dict) -> float | None:
    """The figure a pair is compared on: test ppl (test loss for copy memory), else the valid one; per word
    for subword runs (test_word_ppl), so a sentencepiece run and a word-level baseline compare like for
    like."""
    if row["corpus"] == "copy":
        return row["test_loss"] if row["test_loss"] is not None else row["valid_loss"]
    if row["test_word_ppl"] is not None:
        return row["test_word_ppl"]
    return row["test_ppl"] if row["test_ppl"] is not None else row["valid_ppl"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pair_runs(runs: list[dict]) -> list[dict]:
    """DEQ run x unrolled baseline rows; fills ``paired_with``, ``mem_ratio`` and ``ppl_gap`` in the runs'
    own rows (``paired_with``: a DEQ row's baseline run, a baseline row's DEQ run).

    Runs pair when they share corpus and a non-empty ``pair`` and one is ``core=deq``, the other ``unrolled``.
    Of several runs of one experiment, seed and recipe (width and budget), the newest evaluated one (else the
    newest) represents it. A DEQ run pairs with the baselines of its own width trained on the same budget
    (data, batch, segment, steps, eval settings) when it has any, else with the same-budget ones, else with
    every baseline, and the pair's notes say what differs. In a seed
    study (several baselines, one of them with a DEQ's seed) runs pair seed by seed; a DEQ seed without its
    baseline stays unpaired.
    """
    latest: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: (r["eval"] is not None, r["dir"].name)):
        row = run["row"]
        if row["pair"]:
            latest[(row["corpus"], row["pair"], row["experiment"], row["seed"], _recipe(run["cfg"]))] = run
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for (corpus, pair, *_), run in sorted(latest.items()):
        groups[(corpus, pair)].append(run)
    pairs = []
    for (_, pair), members in groups.items():
        baselines = [m for m in members if m["row"]["core"] == "unrolled"]
        deqs = [m for m in members if m["row"]["core"] == "deq" and not pretrain_only(m["row"])]
        by_seed = len(baselines) > 1 and any(
            x["row"]["seed"] == d["row"]["seed"] for x in baselines for d in deqs
        )
        for d in deqs:
            budget = [x for x in baselines if not _budget_differences(d["cfg"], x["cfg"], d["row"], x["row"])]
            width = [x for x in budget if x["cfg"].model.d_model == d["cfg"].model.d_model]
            same = width or budget or baselines
            for x in [x for x in same if x["row"]["seed"] == d["row"]["seed"]] if by_seed else same:
                dr, xr = d["row"], x["row"]
                pairs.append(_pair_row(pair, d, x))
                dr.update(paired_with=xr["run"], mem_ratio=pairs[-1]["mem_ratio"],
                          ppl_gap=pairs[-1]["ppl_gap"])
                xr["paired_with"] = xr["paired_with"] or dr["run"]
    return pairs


def _recipe(cfg: ExperimentConfig) -> tuple[int, int, int, int]:
    """What tells apart two runs that share an experiment name and seed (a study at another width or
    budget reusing the pair of record's files): width, steps, batch, segment."""
    return cfg.model.d_model, cfg.train.max_steps, cfg.data.batch_size, cfg.data.tgt_len


def _pair_row(pair: str, d: dict, x: dict) -> dict:
    """One row of the pair table: DEQ run ``d`` against unrolled run ``x``, the gap both absolute and relative
    (the issues' targets are relative), memory both as the process peak and as the model's own tensors."""
    dr, xr = d["row"], x["row"]
    deq, unrolled = _headline(dr), _headline(xr)
    rel = _ratio(deq, unrolled)
    return {
        "pair": pair, "corpus": dr["corpus"], "seed": dr["seed"], "deq_experiment": dr["experiment"],
        "unrolled_experiment": xr["experiment"], "arch": dr["arch"], "width": d["cfg"].model.d_model,
        "train_tokens": d["cfg"].train.max_steps * d["cfg"].data.batch_size * d["cfg"].data.tgt_len,
        "deq_run": dr["run"], "deq_code": dr.get("code"),
        "unrolled_run": xr["run"], "unrolled_code": xr.get("code"),
        "deq_test": deq, "unrolled_test": unrolled,
        "ppl_gap": None if deq is None or unrolled is None else deq - unrolled,
        "gap_pct": None if rel is None else 100.0 * (rel - 1.0),
        "deq_mem_gib": dr["peak_train_mem_gib"], "unrolled_mem_gib": xr["peak_train_mem_gib"],
        "mem_ratio": _ratio(dr["peak_train_mem_gib"], xr["peak_train_mem_gib"]),
        "model_mem_ratio": _ratio(dr.get("model_mem_mib"), xr.get("model_mem_mib")),
        "deq_params_nonembedding": dr["params_nonembedding"],
        "unrolled_params_nonembedding": xr["params_nonembedding"],
        "speed_ratio": _ratio(xr["tokens_per_s"], dr["tokens_per_s"]),
        **{f"deq_{k}": dr.get(k) for k in CONVERGENCE_KEYS},
        "notes": "; ".join(_budget_differences(d["cfg"], x["cfg"], dr, xr) + _width_difference(d, x)
                           + _stopped_early(d) + _stopped_early(x)),
    }  # fmt: skip


def _stopped_early(run: dict) -> list[str]:
    """A run that ended before its budget (a time limit, a stop) did not train what its config says."""
    steps, budget = run["row"]["steps"], run["cfg"].train.max_steps
    return [f"{run['row']['core']} stopped at step {steps} of {budget}"] if steps and steps < budget else []


def _width_difference(d: dict, x: dict) -> list[str]:
    """A DEQ paired with a baseline of another width (when none of its own width was trained) says so."""
    a, b = d["cfg"].model.d_model, x["cfg"].model.d_model
    return [] if a == b else [f"width differs ({a} vs {b})"]


def _budget_differences(dc: ExperimentConfig, xc: ExperimentConfig, dr: dict, xr: dict) -> list[str]:
    """Same data, same budget is the pairing's premise; say so where it does not hold."""
    checks = {
        "data": (dc.data.dataset, xc.data.dataset), "tokenizer": (dc.data.tokenizer, xc.data.tokenizer),
        "batch": (dc.data.batch_size, xc.data.batch_size), "tgt_len": (dc.data.tgt_len, xc.data.tgt_len),
        "max_steps": (dc.train.max_steps, xc.train.max_steps),
        "eval settings": ((dr["eval_tgt_len"], dr["eval_mem_len"]), (xr["eval_tgt_len"], xr["eval_mem_len"])),
    }  # fmt: skip
    return [f"{k} differs ({a} vs {b})" for k, (a, b) in checks.items() if a != b]


def seed_means(pairs: list[dict]) -> list[dict]:
    """One row per DEQ experiment against one baseline experiment at one width and budget, over the seeds they
    were paired on: the mean test figures and the gap's mean, spread and range (the figure a seed study
    quotes), and how many of the DEQ's seeds reached their equilibrium."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in pairs:
        key = (p["pair"], p["deq_experiment"], p["unrolled_experiment"], p["width"], p["train_tokens"])
        groups[key].append(p)
    means = []
    for (pair, deq, unrolled, width, tokens), members in groups.items():
        gaps = [p["gap_pct"] for p in members if p["gap_pct"] is not None]
        n_eq = sum(p["deq_equilibrium"] == AT_EQUILIBRIUM for p in members)
        seeds = sorted({p["seed"] for p in members})
        means.append({
            "pair": pair, "deq_experiment": deq, "unrolled_experiment": unrolled, "width": width,
            "train_tokens": tokens, "n_seeds": len(seeds), "seeds": " ".join(map(str, seeds)),
            "deq_test_mean": mean_of_known([p["deq_test"] for p in members]),
            "unrolled_test_mean": mean_of_known([p["unrolled_test"] for p in members]),
            "gap_pct_mean": mean_of_known(gaps),
            "gap_pct_sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
            "gap_pct_min": min(gaps, default=None), "gap_pct_max": max(gaps, default=None),
            "deq_at_equilibrium": f"{n_eq}/{len(members)}",
        })  # fmt: skip
    return means
