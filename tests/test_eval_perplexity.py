"""`python -m deqlm.eval` on tiny fixture runs: it writes the Transformer-XL perplexity computed independently
here, records and applies eval overrides, detects stale eval.json, and fails on one line for bad runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from deqlm.config import ExperimentConfig, save_config, to_dict
from deqlm.eval.cli import main as eval_main
from deqlm.eval.convergence import equilibrium_label
from deqlm.eval.perplexity import _split_result
from deqlm.eval.settings import resolve_eval_settings

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, core: str) -> ExperimentConfig:
    cfg = ExperimentConfig(name=f"tiny_{core}", pair="tiny")
    cfg.data.dataset = "synthetic"
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.synth_vocab = 30
    cfg.data.synth_train_tokens = 1000  # valid and test get 2000 tokens each
    m = cfg.model
    m.core, m.n_layer, m.d_model, m.d_embed, m.n_head, m.d_head, m.d_inner = core, 2, 16, 16, 2, 8, 32
    m.dropout, m.weight_norm, m.pretrain_steps, m.init_std = 0.0, False, 0, 0.05
    cfg.deq.f_max_iter, cfg.deq.b_max_iter = 6, 6
    cfg.eval.batch_size, cfg.eval.tgt_len, cfg.eval.mem_len = 4, 24, 24
    cfg.train.device = "cpu"
    return cfg


def make_trained_run(tmp_path: Path, core: str = "unrolled") -> tuple[Path, ExperimentConfig]:
    """A run directory as the trainer leaves it; the 'trained' model is a seeded random init (step 3)."""
    from deqlm.data.dataset import build_dataset
    from deqlm.models import build_model

    cfg = tiny_config(tmp_path, core)
    ds = build_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.deq, vocab_size=ds.vocab_size)
    run = tmp_path / "runs" / "synthetic" / cfg.name / "20250101-000000"
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "valid/ppl": 1.0, "train/loss": 3.0}) + "\n")
    (run / "env.json").write_text("{}\n")
    (run / "ckpt").mkdir()
    torch.save({"model": model.state_dict(), "step": 3, "config": to_dict(cfg), "vocab_hash": ds.vocab_hash},
               run / "ckpt" / "best.pt")  # fmt: skip
    return run, cfg


def reference_nll(run: Path, cfg: ExperimentConfig, split: str, *, mem_len: int, f_max_iter=None):
    """Transformer-XL protocol written out by hand: B contiguous columns, segments of tgt_len, memory carried,
    every target token of the columns counted once (the last, short segment included)."""
    from deqlm.data.dataset import build_dataset
    from deqlm.models import build_model

    ds = build_dataset(cfg.data)
    model = build_model(cfg.model, cfg.deq, vocab_size=ds.vocab_size)
    model.load_state_dict(torch.load(run / "ckpt" / "best.pt", weights_only=True)["model"])
    model.eval()
    solver = None if f_max_iter is None else {"max_iter": f_max_iter}
    B, L = cfg.eval.batch_size, cfg.eval.tgt_len
    ids = torch.as_tensor(ds.ids(split).astype("int64"))
    S = len(ids) // B
    cols_BS = ids[: B * S].view(B, S)
    nll, n = 0.0, 0
    mems = model.init_mems(B)
    with torch.no_grad():
        for i in range(0, S - 1, L):
            x_BL = cols_BS[:, i : min(i + L, S - 1)]
            y_BL = cols_BS[:, i + 1 : min(i + L, S - 1) + 1]
            out = model(x_BL, y_BL, mems, step=3, mem_len=mem_len, solver=solver)
            mems = out.mems
            nll += float(out.nll_sum)
            n += int(out.n_tokens)
    assert n == B * (S - 1)
    return nll, n


def test_eval_reproduces_independent_transformer_xl_perplexity(tmp_path):
    run, cfg = make_trained_run(tmp_path, "unrolled")
    assert eval_main([str(run)]) == 0
    record = json.loads((run / "eval.json").read_text())
    for split in ("valid", "test"):
        nll, n = reference_nll(run, cfg, split, mem_len=24)
        res = record["splits"][split]
        assert res["n_tokens"] == n
        assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
        assert record[f"{split}_ppl"] == res["ppl"]
    assert record["settings"]["mem_len"] == 24 and record["checkpoint"]["step"] == 3
    assert record["checkpoint"]["file"] == "ckpt/best.pt"
    assert record["params_nonembedding"] > 0 and record["partial"] is False
    assert record["best_possible_ppl"] > 1.0  # synthetic corpus: exp(entropy rate)
    assert record["splits"]["test"]["tokens_per_s"] > 0 and record["peak_mem_gib"] > 0


def test_eval_overrides_are_applied_and_recorded(tmp_path):
    run, cfg = make_trained_run(tmp_path, "deq")
    assert eval_main([str(run), "split=valid", "eval.mem_len=8", "eval.f_max_iter=3"]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert set(record["splits"]) == {"valid"}
    assert record["settings"]["mem_len"] == 8 and record["settings"]["f_max_iter"] == 3
    nll, n = reference_nll(run, cfg, "valid", mem_len=8, f_max_iter=3)
    assert record["valid_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert record["splits"]["valid"]["f_nstep"] is not None


def test_copy_memory_reports_test_loss_not_perplexity(tmp_path):
    from deqlm.data.dataset import build_dataset
    from deqlm.models import build_model

    cfg = tiny_config(tmp_path, "unrolled")
    cfg.name, cfg.data.dataset, cfg.model.n_classes = "tiny_copy", "copy", 10
    cfg.data.copy_T, cfg.data.copy_n_train, cfg.data.copy_n_test = 10, 8, 6
    ds = build_dataset(cfg.data)
    model = build_model(cfg.model, cfg.deq, vocab_size=ds.vocab_size)
    run = tmp_path / "runs" / "copy" / cfg.name / "s1"
    save_config(cfg, run / "config.yaml")
    (run / "ckpt").mkdir()
    torch.save({"model": model.state_dict(), "step": 1}, run / "ckpt" / "last.pt")
    assert eval_main([str(run), "split=test"]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert record["test_ppl"] is None
    assert record["splits"]["test"]["n_tokens"] == 6 * (10 + 20)  # every position of every test sequence
    assert 0 < record["test_loss"] == pytest.approx(record["splits"]["test"]["nll_sum"] / (6 * 30))


def test_root_mode_skips_up_to_date_runs_and_reevaluates_stale_ones(tmp_path, capsys):
    run, _ = make_trained_run(tmp_path, "unrolled")
    root = tmp_path / "runs"
    assert eval_main([str(root), "split=valid"]) == 0
    first = (run / "eval.json").stat().st_mtime_ns
    assert eval_main([str(root), "split=valid"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (run / "eval.json").stat().st_mtime_ns == first
    assert eval_main([str(root), "split=valid", "eval.mem_len=12"]) == 0  # other settings: stale
    assert json.loads((run / "eval.json").read_text())["settings"]["mem_len"] == 12
    ckpt = run / "ckpt" / "best.pt"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # a newer checkpoint
    before = (run / "eval.json").stat().st_mtime_ns
    assert eval_main([str(root), "split=valid", "eval.mem_len=12"]) == 0
    assert (run / "eval.json").stat().st_mtime_ns != before


# ------------------------------------------------------------------------------------------------------------
# bad run directories (no model needed)


def fake_run(tmp_path: Path, name: str = "r") -> Path:
    run = tmp_path / "runs" / "synthetic" / name / "s1"
    save_config(ExperimentConfig(name=name), run / "config.yaml")
    (run / "metrics.jsonl").write_text("")
    (run / "ckpt").mkdir()
    torch.save({"model": {}, "step": 5}, run / "ckpt" / "last.pt")
    return run


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("config", "missing config.yaml"),
        ("ckpt", "no checkpoint"),
        ("corrupt_ckpt", "ckpt/last.pt is damaged"),
    ],
)
def test_bad_run_gives_one_line_error(tmp_path, capsys, breakage, message):
    run = fake_run(tmp_path)
    args = [str(run)]
    if breakage == "config":
        (run / "config.yaml").unlink()
    elif breakage == "ckpt":
        (run / "ckpt" / "last.pt").unlink()
    elif breakage == "corrupt_ckpt":
        (run / "ckpt" / "last.pt").write_bytes(b"\x00not a checkpoint")
    assert eval_main(args) == 2  # a bad run directory is bad input, as for the trainer (deqlm.infra.exits)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run}: ") and message in err[0]


def test_root_mode_warns_about_bad_runs_and_continues(tmp_path, capsys):
    bad = fake_run(tmp_path, "bad")
    (bad / "ckpt" / "last.pt").unlink()
    good = fake_run(tmp_path, "good")
    cfg = ExperimentConfig(name="good")
    settings = resolve_eval_settings(cfg).record(max_tokens=0)
    ckpt = good / "ckpt" / "last.pt"
    (good / "eval.json").write_text(json.dumps({
        "checkpoint": {"file": "ckpt/last.pt", "step": 5, "mtime": ckpt.stat().st_mtime},
        "settings": settings, "splits": {"valid": {}, "test": {}}}))  # fmt: skip
    assert eval_main([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr()
    assert f"up to date: {good}" in out.out
    warnings = out.err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {bad}: no checkpoint")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert eval_main([str(tmp_path), "split=train"]) == 2
    assert eval_main([str(tmp_path), "model.d_model=3"]) == 2  # the checkpoint fixes everything but eval.*
    assert eval_main([str(tmp_path / "missing")]) == 2
    assert eval_main([str(tmp_path)]) == 2  # a folder with no runs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "only eval.* settings" in err[1]


def test_word_perplexity_spreads_the_scored_nll_over_the_words_those_tokens_cover():
    """30 of a split's 32 tokens were scored (the protocol skips each column's first token): word ppl is the
    mean NLL per token times tokens per word, not the scored sum over all 10 words (which reads low)."""
    res = _split_result({"nll_sum": 90.0, "n_tokens": 30}, word_count=10, token_count=32, copy_task=False)
    assert res["word_ppl"] == pytest.approx(math.exp(3.0 * 32 / 10))


def test_eval_settings_resolve_each_not_set_marker_to_the_value_it_stands_for():
    cfg = ExperimentConfig()  # eval.f_max_iter, eval.f_tol and eval.clamp_len null: not set
    cfg.model.core, cfg.model.clamp_len = "deq", 40
    cfg.deq.f_max_iter, cfg.deq.f_tol = 30, 1e-3
    s = resolve_eval_settings(cfg)
    assert (s.f_max_iter, s.f_tol, s.clamp_len) == (30, 1e-3, 40)
    cfg.eval.f_max_iter, cfg.eval.f_tol, cfg.eval.clamp_len = 5, 1e-2, 0
    s = resolve_eval_settings(cfg)
    assert (s.f_max_iter, s.f_tol, s.clamp_len) == (5, 1e-2, 0)
    solver = {"max_iter": 5, "tol": 1e-2}
    assert s.model_kwargs() == {"mem_len": cfg.eval.mem_len, "clamp_len": 0, "solver": solver}
    cfg.model.core = "unrolled"  # no solver: nothing to override, nothing recorded
    s = resolve_eval_settings(cfg)
    assert s.f_max_iter is s.f_tol is s.f_solver is s.model_kwargs()["solver"] is None


def test_solver_caps_sweep_one_checkpoint_and_its_own_cap_reproduces_eval_json(tmp_path, capsys):
    run, cfg = make_trained_run(tmp_path, core="deq")
    assert eval_main([str(run), "caps=1,2,6"]) == 0
    record = json.loads((run / "eval.json").read_text())
    caps = json.loads((run / "solver_caps.json").read_text())
    assert [p["cap"] for p in caps["points"]] == [1, 2, 6]
    assert caps["checkpoint"] == record["checkpoint"] and caps["split"] == "test"
    assert all(p["f_nstep"] <= p["cap"] and p["tol"] == cfg.deq.f_tol for p in caps["points"])
    own = next(p for p in caps["points"] if p["cap"] == cfg.deq.f_max_iter)
    assert own["ppl"] == pytest.approx(record["test_ppl"], rel=1e-9)  # the same weights, the same settings
    assert caps["points"][0]["ppl"] != pytest.approx(own["ppl"], rel=1e-6)  # the cap does change the answer


def test_solver_caps_are_refused_for_a_named_unrolled_run_and_skipped_in_a_folder(tmp_path, capsys):
    run, _ = make_trained_run(tmp_path, core="unrolled")
    assert eval_main([str(run), "caps=default"]) == 2
    assert "no solver" in capsys.readouterr().err
    assert eval_main([str(run.parent.parent), "caps=default"]) == 0
    assert not (run / "solver_caps.json").exists()
    assert eval_main([str(run), "caps=0,x"]) == 2


def test_eval_json_says_whether_the_deq_reached_its_fixed_point(tmp_path):
    run, cfg = make_trained_run(tmp_path, "deq")
    events = [{"step": s, "mode": "deq", "solver/f_nstep": float(s), "solver/f_rel_res": 0.01 * s,
               "solver/converged_frac": 1.0 if s < 9 else 0.0} for s in range(1, 11)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert eval_main([str(run)]) == 0
    record = json.loads((run / "eval.json").read_text())
    conv, test = record["convergence"], record["splits"]["test"]
    assert conv["eval"] == {k: test[k] for k in ("f_nstep", "f_rel_res", "converged_frac")}
    # the last 20% of 10 steps: steps 8, 9 and 10
    assert conv["train_tail"] == pytest.approx({"f_nstep": 9.0, "f_rel_res": 0.09, "converged_frac": 1 / 3})
    assert conv["max_rel_res"] == 0.05 and conv["label"] in ("at equilibrium", "not at equilibrium")
    assert conv["label"] == equilibrium_label("deq", conv["eval"])  # the threshold itself: test_eval_report
    assert len(record["eval_code"]["source_sha256"]) == 64


def test_solver_probe_reads_validation_only_and_refuses_an_unrolled_run(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("solver_probe", ROOT / "scripts" / "solver_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    import deqlm.eval.loop as loop

    splits_read = []
    real_evaluate = loop.evaluate

    def spy(model, dataset, split, *args, **kwargs):
        splits_read.append(split)
        return real_evaluate(model, dataset, split, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", spy)
    run, _ = make_trained_run(tmp_path, "deq")
    rows = probe.probe(run, ["broyden", "anderson"], [1, 4], 1e-3, 200)
    assert set(splits_read) == {"valid"} and len(splits_read) == 4
    assert [(r["solver"], r["cap"]) for r in rows] == [("broyden", 1), ("broyden", 4), ("anderson", 1),
                                                        ("anderson", 4)]
    assert all(r["f_nstep"] <= r["cap"] and r["n_tokens"] >= 200 for r in rows)
    assert not (run / "eval.json").exists()  # it chooses settings: nothing is written
    flat, _ = make_trained_run(tmp_path / "u", "unrolled")
    with pytest.raises(SystemExit, match="not a DEQ run"):
        probe.probe(flat, ["broyden"], [4], 1e-3, 200)


def test_jacobian_probe_measures_each_column_on_validation_and_refuses_an_unrolled_run(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jacobian_probe", ROOT / "scripts" / "jacobian_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    run, cfg = make_trained_run(tmp_path, "deq")
    before = sorted(p.name for p in run.iterdir())
    row = probe.probe(run, segments=2, power_iters=20)
    assert row["segments"] == 2 and row["columns"] == 2 * cfg.eval.batch_size
    assert 0 < row["rho_median"] <= row["rho_max"] and math.isfinite(row["rho_max"])
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into the run folder
    flat, _ = make_trained_run(tmp_path / "u", "unrolled")
    with pytest.raises(SystemExit, match="not a DEQ run"):
        probe.probe(flat, segments=1, power_iters=5)
