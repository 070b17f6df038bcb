"""Faults a user meets (bad files, damaged checkpoints, kills, signals) end in one line, a clear exit code
and nothing already written lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deqlm.config import ConfigError, changed_settings, load_config, to_dict, to_yaml
from deqlm.eval.cli import main as eval_main
from deqlm.infra import run_folder
from deqlm.infra.io import read_jsonl
from deqlm.infra.run_folder import load_checkpoint
from deqlm.train.cli import main as train_main
from deqlm.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "debug"
TINY = ["log.wandb_mode=disabled", "log.progress=false", "train.threads=1", "train.log_every=1",
        "train.eval_every=2", "train.ckpt_every=2", "train.eval_max_tokens=200"]


def train_debug_run(root: Path, tiny: list[str]) -> Path:
    """A debug Transformer-XL run trained to its end at step 2 under `root`: its run folder."""
    cfg = load_config(DEBUG / "transformer_xl.yaml", [f"train.run_dir={root}", "train.max_steps=2", *tiny])
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """best.pt and last.pt both at step 2."""
    return train_debug_run(tmp_path_factory.mktemp("runs"), TINY)


def snapshot(folder: Path) -> dict:
    """Every file of a run folder with its mtime and bytes, but the lock (it names whoever last held it)."""
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != run_folder.LOCK}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- 6: empty experiment files ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_experiment_file_without_settings_is_refused_naming_the_file(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty.yaml"):
        load_config(path)
    assert train_main([str(path), f"train.run_dir={tmp_path}"]) == 2
    assert "empty.yaml: the file holds no settings" in one_error_line(capsys)
    assert not (tmp_path / "synthetic").exists()


# -- 7: numeric settings out of range -----------------------------------------------------------------------


@pytest.mark.parametrize("override", [
    "deq.f_tol=-1", "deq.b_tol=-0.5", "deq.f_tol=nan", "deq.b_tol=inf",
    "deq.f_max_iter=0", "deq.b_max_iter=0", "eval.f_max_iter=0", "eval.clamp_len=-1",
    "deq.broyden_rank=0", "deq.anderson_m=0", "deq.anderson_beta=0", "deq.anderson_beta=1.5",
    "deq.anderson_lam=-0.1", "deq.grad=0", "deq.grad=-3",
    "optim.lr=nan", "optim.lr=inf", "optim.lr=0", "optim.clip=nan", "optim.betas=[0.9,1.0]",
    "train.threads=-1", "train.threads=0", "train.max_bad_steps=0", "eval.f_max_iter=-1", "eval.f_tol=-1",
    "model.rec_gain=0",
])
def test_out_of_range_settings_are_refused_when_the_config_loads(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEBUG / "transformer_deq.yaml", [override])


def test_the_edges_of_each_range_and_null_for_not_set_are_accepted():
    cfg = load_config(DEBUG / "transformer_deq.yaml", [
        "deq.f_tol=0", "deq.b_tol=0", "deq.anderson_beta=1", "deq.anderson_lam=0", "deq.anderson_m=1",
        "deq.broyden_rank=1", "deq.grad=2", "train.threads=null", "eval.f_max_iter=1", "eval.f_tol=0",
        "eval.clamp_len=null", "optim.clip=0", "optim.betas=[0,0.999]"])
    assert cfg.eval.f_max_iter == 1 and cfg.eval.clamp_len is None and cfg.train.threads is None


def test_a_setting_that_is_legal_now_keeps_its_value_when_the_saved_config_is_read_back():
    cfg = load_config(DEBUG / "transformer_deq.yaml", ["eval.f_tol=0", "eval.clamp_len=0"])
    again = load_config(text=to_yaml(cfg))
    assert (again.eval.f_tol, again.eval.clamp_len) == (0.0, 0)


def test_a_resume_error_does_not_call_an_older_form_of_the_same_setting_a_change():
    cfg = load_config(DEBUG / "transformer_deq.yaml", ["model.d_inner=40"])
    saved = to_dict(load_config(DEBUG / "transformer_deq.yaml"))
    saved["data"]["mem_len"], saved["model"]["rec_gain"] = 16, 0.0  # as older code saved it
    changed = changed_settings(saved, cfg, "model")
    assert len(changed) == 1 and changed[0].startswith("model.d_inner ") and changed[0].endswith(" -> 40")


def test_a_range_error_says_null_is_the_way_to_leave_an_optional_setting_unset():
    with pytest.raises(ConfigError, match=r"eval\.f_max_iter=0 must lie in \[1, inf\) or null"):
        load_config(DEBUG / "transformer_deq.yaml", ["eval.f_max_iter=0"])


def test_a_saved_config_in_the_older_forms_loads_with_the_meaning_it_had(tmp_path):
    old = load_config(DEBUG / "transformer_deq.yaml", ["eval.f_max_iter=7"])
    text = to_yaml(old).replace("f_max_iter: 7", "f_max_iter: 0")  # the eval section's, the older "not set"
    text = text.replace("  f_tol: null", "  f_tol: 0.0").replace("  clamp_len: null", "  clamp_len: -1")
    text = text.replace("  threads: null\n", "  threads: 0\n")
    text = text.replace("deq:\n", "deq:\n  eval_f_max_iter: 5\n")
    text = text.replace("data:\n", "data:\n  mem_len: 99\n")
    cfg = load_config(text=text)
    assert (cfg.eval.f_max_iter, cfg.eval.f_tol, cfg.eval.clamp_len) == (5, None, None)
    assert cfg.train.threads is None and cfg.deq.f_max_iter == old.deq.f_max_iter


def test_eval_refuses_an_out_of_range_eval_setting_before_loading_anything(run, capsys):
    (run / "ckpt" / "best.pt").write_bytes(b"")  # would fail later, if the settings got that far
    assert eval_main([str(run), "eval.f_max_iter=-1"]) != 0
    assert "eval.f_max_iter=-1 must lie in [1, inf) or null" in one_error_line(capsys)


# -- 8: damaged checkpoints ---------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_from_a_damaged_last_pt_names_it_offers_best_pt_and_changes_nothing(run, capsys):
    _truncate(run / "ckpt" / "last.pt")
    before = snapshot(run)
    assert train_main(["--resume", str(run), "train.max_steps=4"]) == 2
    line = one_error_line(capsys)
    assert f"{run}/ckpt/last.pt is damaged" in line and "best.pt (step 2) is intact" in line
    assert snapshot(run) == before
    # the advice works: best.pt over last.pt, and the run goes on
    shutil.copy(run / "ckpt" / "best.pt", run / "ckpt" / "last.pt")
    assert train_main(["--resume", str(run), "train.max_steps=3"]) == 0
    assert load_checkpoint(run / "ckpt" / "last.pt")["step"] == 3


def test_resume_with_both_checkpoints_damaged_says_to_start_again(run, capsys):
    (run / "ckpt" / "last.pt").write_bytes(b"\x00not a checkpoint")
    _truncate(run / "ckpt" / "best.pt")
    assert train_main(["--resume", str(run), "train.max_steps=4"]) == 2
    line = one_error_line(capsys)
    assert "last.pt is damaged (not a checkpoint" in line and "no intact best.pt either" in line


def test_eval_falls_back_from_a_damaged_best_pt_to_last_pt_and_says_so(run, capsys):
    _truncate(run / "ckpt" / "best.pt")
    assert eval_main([str(run), "split=valid", "max_tokens=64"]) == 0
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"warning: {run}: ckpt/best.pt is damaged (")
    assert notes[0].endswith("; evaluating ckpt/last.pt instead")
    assert json.loads((run / "eval.json").read_text())["checkpoint"]["file"] == "ckpt/last.pt"


# -- damaged training logs (deqlm.infra.io.read_jsonl) -------------------------------------------------------


def test_resume_with_a_corrupt_line_inside_metrics_jsonl_names_it_and_changes_nothing(run, capsys):
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    before = snapshot(run)
    assert train_main(["--resume", str(run), "train.max_steps=4"]) == 2
    assert "metrics.jsonl: line 2 is not JSON" in one_error_line(capsys)
    assert snapshot(run) == before


def test_resume_drops_a_torn_last_line_of_metrics_jsonl(run):
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "train/lo')  # a kill in the middle of a write
    assert train_main(["--resume", str(run), "train.max_steps=3"]) == 0
    steps = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e]
    assert steps == [1, 2, 3]


# -- 9: temp files of interrupted checkpoint writes ---------------------------------------------------------


def test_resume_removes_the_temp_files_of_interrupted_checkpoint_writes_and_says_so(run, capsys):
    stale = [run / "ckpt" / ".last.pt.k1ll3d.tmp", run / "ckpt" / ".best.pt.x7q2zz.tmp"]
    for path in stale:
        path.write_bytes(b"\x00" * 4096)
    assert train_main(["--resume", str(run), "train.max_steps=3"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("removed ")]
    assert len(notes) == 1 and "2 temp file(s)" in notes[0]
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["best.pt", "last.pt"]


# -- 10: resuming a run that is already there ---------------------------------------------------------------


@pytest.mark.parametrize("max_steps", [1, 2])
def test_resume_of_a_run_already_at_max_steps_says_nothing_to_do_and_leaves_it_alone(run, capsys, max_steps):
    before = snapshot(run)
    assert train_main(["--resume", str(run), f"train.max_steps={max_steps}"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.strip().count("\n") == 0
    assert "already at step 2" in out.out and "nothing to do" in out.out
    assert snapshot(run) == before


# -- 11: SIGTERM and Ctrl-C ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_exits_with_128_plus_its_number(tmp_path, signum):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "deqlm.train", str(DEBUG / "transformer_xl.yaml"),
            f"train.run_dir={tmp_path}", *TINY, "train.max_steps=100000", "train.eval_every=0",
            "train.ckpt_every=0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in tmp_path.glob("*/*/*/metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    lines = err.strip().splitlines()
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {name} after step"), err
    step = int(lines[0].split("after step ")[1].split(";")[0])
    (run_dir,) = tmp_path.glob("*/*/*")
    assert load_checkpoint(run_dir / "ckpt" / "last.pt")["step"] == step >= 1
