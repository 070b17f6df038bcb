"""The comparison report renders from synthesized run directories (no model, no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from deqlm.config import ExperimentConfig, load_config, save_config
from deqlm.eval.convergence import equilibrium_label
from deqlm.eval.report import main as report_main
from deqlm.eval.report import write_report

REQUIRED = ["run", "experiment", "core", "pair", "params_nonembedding", "valid_ppl", "test_ppl",
            "peak_train_mem_gib", "activation_bytes", "tokens_per_s", "f_nstep_mean",
            "paper_test"]  # fmt: skip


def make_run(root: Path, corpus: str, name: str, core: str, *, pair: str = "", mem_gib: float = 1.0,
             test: float = 30.0, stamp: str = "20250101-000000", with_eval: bool = True,
             max_steps: int = 30, seed: int = 1111, n_layer: int = 16,
             act_mib_per_step: float = 1.0) -> Path:  # fmt: skip
    """A run directory as the trainer leaves it, plus an eval.json as deqlm.eval writes it."""
    run = root / corpus / name / stamp
    cfg = ExperimentConfig(name=name, pair=pair, paper_test=test - 1.0)
    cfg.model.core = core
    cfg.train.max_steps = max_steps
    cfg.train.seed = seed
    cfg.model.n_layer = n_layer
    cfg.data.dataset = corpus
    save_config(cfg, run / "config.yaml")
    lines = []
    for step in (10, 20, 30):
        ev = {"step": step, "train/loss": 5.0 - step / 10, "speed/tokens_per_s": 1000.0 + step,
              "mem/peak_gib": mem_gib * step / 30, "mem/peak_kind": "cuda_max_allocated",
              "mem/activation_bytes": int(2**20 * act_mib_per_step * step), "mem/state_bytes": 2**20,
              "time/elapsed_s": 60.0 * step,
              "mode": core}  # fmt: skip
        if core == "deq":
            ev.update({"solver/f_nstep": 10.0 + step / 10, "solver/f_rel_res": 1e-3 / step,
                       "solver/b_nstep": 12.0, "solver/b_rel_res": 1e-4})  # fmt: skip
        lines.append(json.dumps(ev))
        valid = {"valid/ppl": test * (1 + 1 / step), "valid/loss": math.log(test), "step": step}
        valid["time/elapsed_s"] = 60.0 * step
        lines.append(json.dumps(valid))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_eval:
        metric = {"valid_ppl": test + 1, "test_ppl": test, "valid_loss": math.log(test + 1),
                  "test_loss": math.log(test)}  # fmt: skip
        if corpus == "copy":
            metric.update(valid_ppl=None, test_ppl=None, valid_loss=1e-3, test_loss=test)
        record = {"experiment": name, "corpus": corpus, "core": core, "pair": pair,
                  "checkpoint": {"file": "ckpt/best.pt", "step": 30, "mtime": 0.0},
                  "settings": {"batch_size": 10, "tgt_len": 150, "mem_len": 300, "clamp_len": -1,
                               "f_max_iter": 30 if core == "deq" else None, "f_tol": 1e-3, "max_tokens": 0},
                  "partial": False, "params_total": 2000, "params_nonembedding": 1000,
                  "best_possible_ppl": None, "splits": {"test": {"tokens_per_s": 5000.0}},
                  **metric}  # fmt: skip
        (run / "eval.json").write_text(json.dumps(record))
    else:
        (run / "ckpt").mkdir()
        (run / "ckpt" / "last.pt").write_bytes(b"placeholder")
    return run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_contains_every_run_and_pairs_deq_with_its_unrolled_baseline(tmp_path):
    deq = make_run(tmp_path, "wt103", "tx_deq", "deq", pair="tx_small", mem_gib=1.0, test=32.0,
                   act_mib_per_step=0.1)
    baseline = make_run(tmp_path, "wt103", "tx_unrolled", "unrolled", pair="tx_small", mem_gib=4.0, test=35.0)
    lone = make_run(tmp_path, "wt103", "tx_lone", "unrolled", with_eval=False)
    logs: list[str] = []
    out = tmp_path / "out"
    rows = write_report([deq, baseline, lone], out, "fixture", log=logs.append)

    assert len(rows) == 3
    table = read_csv(out / "summary.csv")
    assert set(REQUIRED) <= set(table[0])
    by_exp = {r["experiment"]: r for r in table}
    assert set(by_exp) == {"tx_deq", "tx_unrolled", "tx_lone"}
    d = by_exp["tx_deq"]
    assert float(d["mem_ratio"]) == pytest.approx(0.25)
    assert float(d["ppl_gap"]) == pytest.approx(-3.0)
    assert d["paired_with"] == by_exp["tx_unrolled"]["run"]
    assert float(d["f_nstep_mean"]) == pytest.approx(12.0)
    assert float(d["paper_test"]) == pytest.approx(31.0)
    assert by_exp["tx_unrolled"]["f_nstep_mean"] == ""
    assert by_exp["tx_lone"]["test_ppl"] == ""  # no eval.json: blank, never the training log's figure
    assert any("tx_lone" in m and m.startswith("warning:") for m in logs)

    md = (out / "summary.md").read_text()
    for row in table:
        assert row["run"] in md
    assert "## DEQ vs unrolled baseline" in md and "0.25" in md
    pairs = read_csv(out / "pairs.csv")
    assert len(pairs) == 1 and pairs[0]["notes"] == ""
    assert float(pairs[0]["gap_pct"]) == pytest.approx(100 * (32.0 / 35.0 - 1))
    # model memory = the largest logged activation bytes (3 vs 30 MiB) + 1 MiB of state
    assert float(pairs[0]["model_mem_ratio"]) == pytest.approx(4.0 / 31.0)
    for png in ("perplexity.png", "memory.png", "solver.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in md


def test_a_subword_run_is_paired_on_its_perplexity_per_word(tmp_path):
    deq = make_run(tmp_path, "wt103", "tx_deq", "deq", pair="tx", test=60.0)  # per subword token
    baseline = make_run(tmp_path, "wt103", "tx_unrolled", "unrolled", pair="tx", test=35.0)
    record = json.loads((deq / "eval.json").read_text())
    (deq / "eval.json").write_text(json.dumps({**record, "test_word_ppl": 33.0}))
    out = tmp_path / "out"
    write_report([deq, baseline], out, "fixture", log=lambda m: None)
    assert float(read_csv(out / "pairs.csv")[0]["ppl_gap"]) == pytest.approx(-2.0)
    assert "test ppl per word" in (out / "summary.md").read_text()


def test_report_for_copy_memory_uses_test_loss(tmp_path):
    deq = make_run(tmp_path, "copy", "copy_deq", "deq", pair="copy", test=3.5e-6)
    baseline = make_run(tmp_path, "copy", "copy_tcn", "unrolled", pair="copy", test=2.7e-5)
    write_report([deq, baseline], tmp_path / "out", "copy memory", log=lambda m: None)
    table = {r["experiment"]: r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert float(table["copy_deq"]["test_loss"]) == pytest.approx(3.5e-6)
    assert table["copy_deq"]["test_ppl"] == ""
    assert float(table["copy_deq"]["ppl_gap"]) == pytest.approx(3.5e-6 - 2.7e-5)
    assert "test loss" in (tmp_path / "out" / "summary.md").read_text()


def test_report_cli_groups_by_corpus_and_skips_bad_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "wt103", "a_deq", "deq", pair="p")
    make_run(runs, "wt103", "a_unrolled", "unrolled", pair="p")
    make_run(runs, "ptb", "b_deq", "deq")
    bad = make_run(runs, "ptb", "b_bad", "deq")
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')

    assert report_main([str(runs), "--out", str(tmp_path / "results")]) == 0
    err = capsys.readouterr().err
    assert len(read_csv(tmp_path / "results" / "wt103" / "summary.csv")) == 2
    assert [r["experiment"] for r in read_csv(tmp_path / "results" / "ptb" / "summary.csv")] == ["b_deq"]
    warnings = [line for line in err.splitlines() if "b_bad" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert "corrupt metrics.jsonl" in warnings[0]


@pytest.mark.parametrize(
    "breakage, message",
    [("config", "missing config.yaml"), ("metrics", "corrupt metrics.jsonl"), ("nothing", "no checkpoint")],
)
def test_report_cli_bad_run_is_a_one_line_error(tmp_path, capsys, breakage, message):
    run = make_run(tmp_path, "wt103", "x", "deq")
    if breakage == "config":
        (run / "config.yaml").unlink()
    elif breakage == "metrics":
        (run / "metrics.jsonl").write_text("[1, 2]\n")
    else:
        (run / "eval.json").unlink()
    assert report_main([str(run), "--out", str(tmp_path / "out")]) == 2  # bad input (deqlm.infra.exits)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run}: ") and message in err[0]


def test_torn_last_metrics_line_is_tolerated(tmp_path):
    run = make_run(tmp_path, "wt103", "x", "deq")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 40, "valid/p')  # the trainer is mid-write
    rows = write_report([run], tmp_path / "out", "t", log=lambda m: None)
    assert rows[0]["steps"] == 30


def test_deq_runs_pair_only_with_baselines_of_the_same_budget(tmp_path):
    runs = [
        make_run(tmp_path, "copy", "cpu_deq", "deq", pair="copy", max_steps=150, test=0.15),
        make_run(tmp_path, "copy", "cpu_baseline", "unrolled", pair="copy", max_steps=150, test=0.05),
        make_run(tmp_path, "copy", "gpu_deq", "deq", pair="copy", max_steps=5000, test=0.05),
        make_run(tmp_path, "copy", "gpu_baseline", "unrolled", pair="copy", max_steps=5000, test=4e-5),
        make_run(tmp_path, "copy", "odd_deq", "deq", pair="copy", max_steps=77, test=0.2),
    ]
    write_report(runs, tmp_path / "out", "fixture", log=lambda _: None)
    pairs = {(r["deq_run"].split("/")[-2], r["unrolled_run"].split("/")[-2]): r
             for r in read_csv(tmp_path / "out" / "pairs.csv")}  # fmt: skip
    assert {("cpu_deq", "cpu_baseline"), ("gpu_deq", "gpu_baseline")} <= set(pairs)
    assert ("cpu_deq", "gpu_baseline") not in pairs and ("gpu_deq", "cpu_baseline") not in pairs
    # a DEQ run without a same-budget baseline still gets compared, with the difference spelled out
    odd = [r for k, r in pairs.items() if k[0] == "odd_deq"]
    assert len(odd) == 2 and all("max_steps differs" in r["notes"] for r in odd)


def test_a_seed_study_pairs_every_deq_seed_with_the_baseline_of_its_own_seed(tmp_path):
    runs = [make_run(tmp_path, "copy", name, core, pair="copy", seed=seed, stamp=f"20250101-00000{seed}")
            for name, core, seeds in (("deq", "deq", (1, 2, 3)), ("baseline", "unrolled", (1, 2)))
            for seed in seeds]  # fmt: skip
    rows = write_report(runs, tmp_path / "out", "fixture", log=lambda _: None)
    assert len(rows) == 5 and sorted(r["seed"] for r in rows) == [1, 1, 2, 2, 3]
    pairs = [(r["deq_run"][-1], r["unrolled_run"][-1]) for r in read_csv(tmp_path / "out" / "pairs.csv")]
    assert sorted(pairs) == [("1", "1"), ("2", "2")]  # seed 3 has no baseline of its own: unpaired


def test_deq_activation_figure_leaves_out_the_pretraining_steps(tmp_path):
    run = make_run(tmp_path, "ptb", "tn_deq", "deq", pair="tn")
    with open(run / "metrics.jsonl", "a") as fh:  # a pretraining step that saved far more than any DEQ step
        fh.write(json.dumps({"step": 5, "mode": "pretrain", "mem/activation_bytes": 2**40}) + "\n")
    write_report([run], tmp_path / "out", "fixture", log=lambda _: None)
    (row,) = read_csv(tmp_path / "out" / "summary.csv")
    assert int(row["activation_bytes"]) == 2**20 * 30


def test_a_deq_run_evaluated_in_its_pretraining_is_labelled_and_not_paired(tmp_path):
    deq = make_run(tmp_path, "ptb", "tx_deq", "deq", pair="tx", test=30.0)
    baseline = make_run(tmp_path, "ptb", "tx_unrolled", "unrolled", pair="tx", test=35.0)
    record = json.loads((deq / "eval.json").read_text())
    (deq / "eval.json").write_text(json.dumps({**record, "mode": "pretrain"}))
    logs: list[str] = []
    out = tmp_path / "out"
    write_report([deq, baseline], out, "fixture", log=logs.append)
    table = {r["experiment"]: r for r in read_csv(out / "summary.csv")}
    assert table["tx_deq"]["mode"] == "pretrain" and table["tx_deq"]["paired_with"] == ""
    assert not (out / "pairs.csv").exists()
    assert "deq (pretrain only)" in (out / "summary.md").read_text()
    assert any("never left its pretraining" in m for m in logs)


def test_the_summary_header_names_the_partially_evaluated_runs(tmp_path):
    whole = make_run(tmp_path, "ptb", "a", "unrolled")
    part = make_run(tmp_path, "ptb", "b", "unrolled")
    record = json.loads((part / "eval.json").read_text())
    record["settings"]["max_tokens"] = 5000
    (part / "eval.json").write_text(json.dumps({**record, "partial": True}))
    out = tmp_path / "out"
    rows = write_report([whole, part], out, "fixture", log=lambda m: None)
    header = (out / "summary.md").read_text().split("## Runs")[0]
    partial_run = next(r["run"] for r in rows if r["experiment"] == "b")
    whole_run = next(r["run"] for r in rows if r["experiment"] == "a")
    assert f"except partial evals of {partial_run}" in header and whole_run not in header


def test_the_report_cli_never_writes_the_committed_results_unless_asked(tmp_path, monkeypatch):
    make_run(tmp_path / "runs", "ptb", "a", "unrolled")
    monkeypatch.chdir(tmp_path)
    assert report_main(["runs"]) == 0
    assert (tmp_path / "results" / "compare" / "ptb" / "summary.md").is_file()
    assert not (tmp_path / "results" / "ptb").exists()


def test_a_depth_sweep_gets_the_tradeoff_figure_and_a_plain_pair_does_not(tmp_path):
    plain = [make_run(tmp_path, "ptb", "p_deq", "deq", pair="p"),
             make_run(tmp_path, "ptb", "p_x", "unrolled", pair="p")]
    write_report(plain, tmp_path / "plain", "fixture", log=lambda m: None)
    assert not (tmp_path / "plain" / "tradeoff.png").exists()
    sweep = [make_run(tmp_path, "ptb", f"s_L{n}", "unrolled", pair="s", n_layer=n, test=40.0 - n)
             for n in (2, 4, 8)]
    sweep.append(make_run(tmp_path, "ptb", "s_deq", "deq", pair="s", test=33.0))
    rows = write_report(sweep, tmp_path / "sweep", "fixture", log=lambda m: None)
    assert (tmp_path / "sweep" / "tradeoff.png").stat().st_size > 1000
    assert "(tradeoff.png)" in (tmp_path / "sweep" / "summary.md").read_text()
    # activations (30 MiB at the last logged step) plus the logged weights/gradients/optimizer state (1 MiB)
    assert all(r["model_mem_mib"] == 31.0 for r in rows)


def test_a_deq_with_solver_caps_gets_the_compute_knob_figure(tmp_path):
    deq = make_run(tmp_path, "ptb", "k_deq", "deq", pair="k", test=30.0)
    baseline = make_run(tmp_path, "ptb", "k_x", "unrolled", pair="k", test=31.0)
    points = [{"cap": c, "ppl": 30.0 + 8.0 / c, "f_nstep": float(c)} for c in (1, 2, 4, 8)]
    (deq / "solver_caps.json").write_text(json.dumps({"points": points}))
    out = tmp_path / "out"
    write_report([deq, baseline], out, "fixture", log=lambda m: None)
    assert (out / "solver_caps.png").stat().st_size > 1000
    assert "(solver_caps.png)" in (out / "summary.md").read_text()
    write_report([baseline], tmp_path / "none", "fixture", log=lambda m: None)
    assert not (tmp_path / "none" / "solver_caps.png").exists()


def _set_eval_solver(run: Path, f_nstep: float, f_rel_res: float, converged_frac: float) -> None:
    record = json.loads((run / "eval.json").read_text())
    record["splits"]["test"].update(f_nstep=f_nstep, f_rel_res=f_rel_res, converged_frac=converged_frac)
    (run / "eval.json").write_text(json.dumps(record))


def test_a_deq_above_the_residual_threshold_is_labelled_not_at_equilibrium(tmp_path):
    capped = make_run(tmp_path, "ptb", "tn_deq", "deq", pair="tn", test=181.0)
    solved = make_run(tmp_path, "ptb", "tn_deq_f30", "deq", pair="tn", test=180.0)
    baseline = make_run(tmp_path, "ptb", "tn_unrolled", "unrolled", pair="tn", test=177.0)
    _set_eval_solver(capped, 12.0, 0.196, 0.0)
    _set_eval_solver(solved, 21.5, 0.05, 0.4)  # the threshold itself counts as reached
    out = tmp_path / "out"
    write_report([capped, solved, baseline], out, "fixture")
    rows = {r["experiment"]: r for r in read_csv(out / "summary.csv")}
    assert rows["tn_deq"]["equilibrium"] == "not at equilibrium"
    assert float(rows["tn_deq"]["eval_f_rel_res"]) == 0.196 and float(rows["tn_deq"]["eval_f_nstep"]) == 12.0
    assert rows["tn_deq_f30"]["equilibrium"] == "at equilibrium"
    assert rows["tn_unrolled"]["equilibrium"] == "" and rows["tn_unrolled"]["eval_f_rel_res"] == ""
    # end of training: the last 20% of the steps (events at 10, 20, 30: only step 30's figures)
    assert float(rows["tn_deq"]["tail_f_nstep"]) == 13.0
    assert float(rows["tn_deq"]["tail_f_rel_res"]) == pytest.approx(1e-3 / 30)
    pairs = {p["deq_experiment"]: p for p in read_csv(out / "pairs.csv")}
    assert pairs["tn_deq"]["deq_equilibrium"] == "not at equilibrium"
    assert float(pairs["tn_deq"]["deq_eval_converged_frac"]) == 0.0
    text = (out / "summary.md").read_text()
    assert "deq (not at equilibrium)" in text and text.count("deq (not at equilibrium)") == 1


@pytest.mark.parametrize("env, patch, label", [
    ({"git_sha": "0123456789abcdef", "git_dirty": False}, False, "0123456"),
    ({"git_sha": "0123456789abcdef", "git_dirty": True, "git_patch": "code.patch"}, True, "0123456+patch"),
    ({"git_sha": "0123456789abcdef", "git_dirty": True, "git_patch": None}, False, "code not recorded"),
    ({"git_sha": "0123456789abcdef", "git_dirty": True, "git_patch": "code.patch",
      "git_untracked_skipped": ["big.bin"]}, True, "0123456+partial patch"),
    ({"git_sha": None, "git_dirty": None, "source_sha256": "fedcba9876543210"}, False, "src:fedcba9"),
    ({"git_sha": None, "git_dirty": None}, False, "code not recorded"),
])  # fmt: skip
def test_the_code_column_names_a_commit_only_when_its_code_can_be_rebuilt(tmp_path, env, patch, label):
    run = make_run(tmp_path, "ptb", "tx_deq", "deq", pair="tx")
    (run / "env.json").write_text(json.dumps(env))
    if patch:
        (run / "code.patch").write_text("diff --git a/x b/x\n")
    baseline = make_run(tmp_path, "ptb", "tx_unrolled", "unrolled", pair="tx")  # no env.json at all
    write_report([run, baseline], tmp_path / "out", "fixture")
    rows = {r["experiment"]: r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert rows["tx_deq"]["code"] == label and rows["tx_unrolled"]["code"] == "code not recorded"
    (pair,) = read_csv(tmp_path / "out" / "pairs.csv")
    assert pair["deq_code"] == label


def test_a_seed_study_is_summarised_by_its_mean_gap_and_range(tmp_path):
    runs = []
    for seed, deq, unrolled in ((1111, 102.0, 100.0), (2222, 104.0, 100.0), (3333, 109.0, 100.0)):
        runs.append(make_run(tmp_path, "ptb", "tx_deq", "deq", pair="tx", test=deq, seed=seed,
                             stamp=f"2025010{seed % 10}-000000"))
        runs.append(make_run(tmp_path, "ptb", "tx_unrolled", "unrolled", pair="tx", test=unrolled, seed=seed,
                             stamp=f"2025010{seed % 10}-000000"))
    _set_eval_solver(runs[0], 9.0, 1e-3, 1.0)
    _set_eval_solver(runs[2], 9.5, 2e-3, 0.98)
    _set_eval_solver(runs[4], 12.0, 0.2, 0.0)  # seed 3333's DEQ stopped short of its fixed point
    write_report(runs, tmp_path / "out", "fixture")
    (row,) = read_csv(tmp_path / "out" / "pair_means.csv")
    assert row["n_seeds"] == "3" and row["seeds"] == "1111 2222 3333"
    assert float(row["gap_pct_mean"]) == pytest.approx(5.0)
    assert (float(row["gap_pct_min"]), float(row["gap_pct_max"])) == pytest.approx((2.0, 9.0))
    assert float(row["gap_pct_sd"]) == pytest.approx(3.6055, abs=1e-4)
    assert row["deq_at_equilibrium"] == "2/3"
    assert "+5.0 (+2.0 to +9.0)" in (tmp_path / "out" / "summary.md").read_text()


def test_runs_of_one_experiment_at_two_widths_stay_apart_and_pair_within_their_width(tmp_path):
    runs = []
    for width, deq, unrolled in ((64, 102.0, 100.0), (128, 96.0, 90.0)):
        for name, core, test in (("tx_deq", "deq", deq), ("tx_unrolled", "unrolled", unrolled)):
            run = make_run(tmp_path / f"w{width}", "ptb", name, core, pair="tx", test=test)
            cfg = load_config(run / "config.yaml")
            cfg.model.d_model = width
            save_config(cfg, run / "config.yaml")
            runs.append(run)
    _set_eval_solver(runs[0], 9.0, 1e-3, 1.0)
    _set_eval_solver(runs[2], 12.0, 0.08, 0.0)
    out = tmp_path / "out"
    write_report(runs, out, "fixture", log=lambda _: None)
    pairs = {p["width"]: p for p in read_csv(out / "pairs.csv")}
    assert set(pairs) == {"64", "128"}  # same names and seed, kept apart by width, each with its own baseline
    assert float(pairs["64"]["gap_pct"]) == pytest.approx(2.0)
    assert float(pairs["128"]["gap_pct"]) == pytest.approx(100 * (96 / 90 - 1))
    assert pairs["128"]["deq_equilibrium"] == "not at equilibrium" and pairs["64"]["notes"] == ""
    means = {m["width"]: m for m in read_csv(out / "pair_means.csv")}
    assert set(means) == {"64", "128"} and all(m["n_seeds"] == "1" for m in means.values())
    # both parity figures are drawn from these pairs
    assert (out / "gap_by_width.png").stat().st_size > 0 and (out / "gap_by_residual.png").stat().st_size > 0


@pytest.mark.parametrize("core, at_eval, label", [
    ("deq", {"f_nstep": 12.0, "f_rel_res": 0.05}, "at equilibrium"),
    ("deq", {"f_nstep": 12.0, "f_rel_res": 0.0501}, "not at equilibrium"),
    ("deq", {"f_nstep": 12.0, "f_rel_res": None}, "not at equilibrium"),  # every solve diverged
    ("deq", {"f_nstep": None, "f_rel_res": None}, None),  # no solve ran: pretrain only, or not evaluated
    ("unrolled", {"f_nstep": None, "f_rel_res": None}, None),
])  # fmt: skip
def test_the_equilibrium_label_puts_the_threshold_at_a_residual_of_five_percent(core, at_eval, label):
    assert equilibrium_label(core, at_eval) == label


def test_a_run_that_ended_before_its_budget_is_named_in_the_pair_notes(tmp_path):
    deq = make_run(tmp_path, "ptb", "tx_deq", "deq", pair="tx", max_steps=60)  # logs to step 30 only
    baseline = make_run(tmp_path, "ptb", "tx_unrolled", "unrolled", pair="tx", max_steps=30)
    write_report([deq, baseline], tmp_path / "out", "fixture", log=lambda _: None)
    (pair,) = read_csv(tmp_path / "out" / "pairs.csv")
    assert "deq stopped at step 30 of 60" in pair["notes"] and "unrolled stopped" not in pair["notes"]
