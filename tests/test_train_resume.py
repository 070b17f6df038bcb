"""A run killed at any moment resumes from its last checkpoint bitwise-equal losses (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deqlm.config import load_config
from deqlm.infra.io import read_jsonl
from deqlm.train.cli import main as cli_main
from deqlm.train.trainer import Trainer, train

DEBUG = Path(__file__).resolve().parents[1] / "experiments" / "debug"


class Killed(Exception):
    pass


def tiny(tmp_path: Path, exp: str, *overrides: str):
    # dropout on: resuming must restore the RNG that draws the masks
    return load_config(DEBUG / f"{exp}.yaml", [
        f"train.run_dir={tmp_path}", "log.wandb_mode=disabled", "log.progress=false", "train.threads=1",
        "train.max_steps=8", "train.log_every=1", "train.ckpt_every=4", "train.eval_every=3",
        "model.dropout=0.1", *overrides])


def train_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["train/loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e}


def _killed_at(tmp_path: Path, monkeypatch, cfg, step: int) -> Path:
    """Train cfg until `step` is about to run, as if killed there; returns the run directory."""
    real_step = Trainer.train_step

    def dying_step(self, measure_activation):
        if self.step == step:
            raise Killed
        return real_step(self, measure_activation)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    trainer = Trainer(cfg)
    with pytest.raises(Killed):
        trainer.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return trainer.run_dir


@pytest.mark.parametrize("exp", ["transformer_deq", "transformer_xl"])
def test_kill_and_resume_equals_uninterrupted_bitwise(tmp_path, monkeypatch, history, exp):
    # DEQ: pretraining until step 3, then DEQ; the checkpoint at 4 sits after the switch
    extra = ["model.pretrain_steps=3"] if exp == "transformer_deq" else []
    full = train(tiny(tmp_path / "a", exp, *extra))
    cfg = tiny(tmp_path / "b", exp, *extra)
    run_dir = _killed_at(tmp_path, monkeypatch, cfg, 6)  # mid-run, two steps after the checkpoint at step 4
    assert max(train_losses(run_dir)) == 5  # step 5 was logged after the checkpoint, and will be redone

    resumed = Trainer(cfg, resume_dir=run_dir)
    assert resumed.step == 4
    resumed.fit()
    assert history(resumed) == [h for h in history(full) if h[0] > 4]
    assert train_losses(run_dir) == train_losses(full.run_dir)  # bitwise: float repr round-trips
    valid = [(e["step"], e["valid/ppl"]) for e in read_jsonl(run_dir / "metrics.jsonl") if "valid/ppl" in e]
    assert valid == [(e["step"], e["valid/ppl"]) for e in read_jsonl(full.run_dir / "metrics.jsonl")
                     if "valid/ppl" in e]


def test_resume_inside_a_log_window_logs_what_the_uninterrupted_run_logs(tmp_path, monkeypatch):
    """Log every 3 steps, checkpoint at 4, killed at 5: the event at step 6 averages steps 4-6 (loss, grad
    norm, solver stats) only if the checkpoint carried step 4's share of the window."""
    over = ["train.log_every=3", "model.pretrain_steps=3"]
    full = train(tiny(tmp_path / "a", "transformer_deq", *over))
    cfg = tiny(tmp_path / "b", "transformer_deq", *over)
    run_dir = _killed_at(tmp_path, monkeypatch, cfg, 5)
    Trainer(cfg, resume_dir=run_dir).fit()
    keys = ("train/loss", "train/ppl", "optim/grad_norm", "solver/f_nstep", "solver/b_rel_res")

    def logged(run):
        events = read_jsonl(run / "metrics.jsonl")
        return [(e["step"], *(e[k] for k in keys)) for e in events if "train/loss" in e]

    assert logged(run_dir) == logged(full.run_dir)


def test_optimizer_overrides_on_resume_take_effect(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "transformer_xl", "optim.schedule=constant", "optim.warmup_steps=0")
    run_dir = _killed_at(tmp_path, monkeypatch, cfg, 6)
    resumed = Trainer(load_config(run_dir / "config.yaml", ["optim.lr=1e-4", "optim.weight_decay=0.1",
                                                           "optim.betas=[0.8,0.99]"]), resume_dir=run_dir)
    resumed.fit()
    group = resumed.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-4, 0.1, (0.8, 0.99))
    lrs = {e["step"]: e["optim/lr"] for e in read_jsonl(run_dir / "metrics.jsonl") if "optim/lr" in e}
    assert lrs[4] == cfg.optim.lr and lrs[5] == lrs[8] == 1e-4


def test_resume_with_a_model_override_that_does_not_fit_is_a_one_line_error(tmp_path, capsys):
    args = [str(DEBUG / "transformer_xl.yaml"), f"train.run_dir={tmp_path}", "log.wandb_mode=disabled",
            "log.progress=false", "train.threads=1", "train.max_steps=2", "train.eval_every=0"]
    assert cli_main(args) == 0
    run_dir = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run_dir: "))[9:]
    assert cli_main(["--resume", run_dir, "train.max_steps=4", "model.d_inner=40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the configured model" in err[0]


def test_cli_resume_continues_the_run_directory(tmp_path, capsys):
    cfg_args = [str(DEBUG / "transformer_xl.yaml"), f"train.run_dir={tmp_path}", "log.wandb_mode=disabled",
                "log.progress=false", "train.threads=1", "train.max_steps=4", "train.ckpt_every=2",
                "train.log_every=2", "train.eval_every=0"]
    assert cli_main(cfg_args) == 0
    out = capsys.readouterr().out
    run_dir = Path(next(ln for ln in out.splitlines() if ln.startswith("run_dir: "))[len("run_dir: "):])
    assert cli_main(["--resume", str(run_dir), "train.max_steps=6"]) == 0
    steps = sorted(train_losses(run_dir))
    assert steps == [2, 4, 6]
    assert (run_dir / "env-resume-4.json").is_file()
