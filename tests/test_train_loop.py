"""The training loop on tiny CPU configs: loss falls, the log schema is complete, bad steps are skipped."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqlm.config import load_config, save_config
from deqlm.infra.io import read_jsonl
from deqlm.models.lm import SequenceLM
from deqlm.train.trainer import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "debug"

TRAIN_KEYS = {
    "step", "mode", "train/loss", "train/ppl", "train/tokens", "train/skipped_steps", "optim/lr",
    "optim/grad_norm", "speed/tokens_per_s", "speed/step_ms", "mem/peak_gib", "mem/peak_kind",
    "mem/activation_bytes", "mem/state_bytes", "solver/f_nstep", "solver/f_rel_res", "solver/b_nstep",
    "solver/b_rel_res", "solver/converged_frac", "time/elapsed_s",
}
VALID_KEYS = {"step", "mode", "valid/loss", "valid/ppl", "valid/tgt_len", "valid/mem_len", "valid/f_max_iter",
              "train/tokens", "time/elapsed_s"}


def tiny(tmp_path: Path, exp: str = "transformer_deq", *overrides: str):
    return load_config(DEBUG / f"{exp}.yaml", [f"train.run_dir={tmp_path}", "log.wandb_mode=disabled",
                                               "log.progress=false", "train.threads=1", *overrides])


@pytest.fixture
def nan_loss_at(monkeypatch):
    """`nan_loss_at(*steps)`: the training loss of those steps becomes NaN (validation is left alone), as a
    diverged solve or an overflow would make it."""
    real_forward = SequenceLM.forward

    def inject(*steps: int) -> None:
        def forward(self, x_BL, y_BL, mems=None, step=None, **kwargs):
            out = real_forward(self, x_BL, y_BL, mems, step, **kwargs)
            if self.training and step in steps:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(SequenceLM, "forward", forward)

    return inject


def test_tiny_deq_transformer_trains_and_loss_falls(tmp_path, history):
    trainer = train(tiny(tmp_path, "transformer_deq", "train.max_steps=30", "train.log_every=2"))
    losses = [loss for _, loss in history(trainer)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    events = read_jsonl(trainer.run_dir / "metrics.jsonl")
    train_events = [e for e in events if "train/loss" in e]
    assert {e["mode"] for e in train_events} == {"pretrain", "deq"}
    assert all(TRAIN_KEYS <= set(e) for e in train_events)
    deq = [e for e in train_events if e["mode"] == "deq"]
    assert all(e["solver/f_nstep"] is not None and e["solver/b_nstep"] is not None for e in deq)
    assert all(e["mem/activation_bytes"] > 0 for e in train_events)
    assert all(e["mem/peak_kind"] == "cpu_rss_max" for e in train_events)
    valid = [e for e in events if "valid/ppl" in e]
    assert [e["step"] for e in valid] == [15, 30]
    assert all(VALID_KEYS <= set(e) for e in valid)
    assert valid[-1]["valid/f_max_iter"] == 8 and valid[-1]["valid/tgt_len"] == 16
    assert valid[-1]["valid/loss"] < losses[0] - 0.2  # held-out loss fell too (uniform guess: ln 51 = 3.93)


def test_pretrain_steps_n_trains_exactly_n_unrolled_steps(tmp_path):
    trainer = train(tiny(tmp_path, "transformer_deq", "train.max_steps=4", "train.log_every=1",
                         "model.pretrain_steps=2"))
    modes = [e["mode"] for e in read_jsonl(trainer.run_dir / "metrics.jsonl") if "train/loss" in e]
    assert modes == ["pretrain", "pretrain", "deq", "deq"]


def test_seq_splits_trains_a_segment_as_subsequences_with_the_same_loss_and_fewer_activations(tmp_path):
    """Two subsequences of 8 with the memory passed on (mem_len 16 covers the first) see exactly the context
    one segment of 16 sees: the first step's loss agrees; one subsequence's activations are held at once."""
    def first_event(sub: str, *over: str) -> dict:
        cfg = tiny(tmp_path / sub, "transformer_xl", "train.max_steps=2", "train.log_every=1", *over)
        trainer = train(cfg)
        return next(e for e in read_jsonl(trainer.run_dir / "metrics.jsonl") if "train/loss" in e)

    whole, halves = first_event("one"), first_event("two", "data.seq_splits=2")
    assert halves["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-5)
    assert halves["train/ppl"] == pytest.approx(whole["train/ppl"], rel=1e-5)
    assert halves["mem/activation_bytes"] < 0.8 * whole["mem/activation_bytes"]  # 0.71: memory stays


def test_run_directory_holds_config_env_metrics_and_weights_only_checkpoints(tmp_path):
    trainer = train(tiny(tmp_path, "transformer_xl", "train.max_steps=4", "train.eval_every=2",
                         "train.ckpt_every=2", "train.log_every=2"))
    run = trainer.run_dir
    assert run.parent.parent.parent == tmp_path and run.parent.name == "debug_transformer_xl"
    for name in ("config.yaml", "env.json", "metrics.jsonl", "ckpt/last.pt", "ckpt/best.pt"):
        assert (run / name).is_file(), name
    env = (run / "env.json").read_text()
    for key in ("git_sha", "git_dirty", "git_patch", "source_sha256", "torch", "device", "world_size",
                "threads", "cpu_model", "hostname", "start_time"):
        assert f'"{key}"' in env
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "data_state", "rng", "config",
                "vocab_hash", "best_valid_ppl", "wandb_id", "mems"):
        assert key in state, key
    assert state["step"] == 4 and isinstance(state["config"], dict)
    # unrolled core: the solver keys are present and null in every event
    events = [e for e in read_jsonl(run / "metrics.jsonl") if "train/loss" in e]
    assert all(e["mode"] == "unrolled" and e["solver/f_nstep"] is None for e in events)


def test_nan_loss_is_skipped_and_counted(tmp_path, history, nan_loss_at):
    nan_loss_at(3, 4)
    trainer = train(tiny(tmp_path, "transformer_xl", "train.max_steps=6", "train.log_every=6"))
    assert trainer.skipped == 2
    assert [s for s, _ in history(trainer)] == [1, 2, 5, 6]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    last = [e for e in read_jsonl(trainer.run_dir / "metrics.jsonl") if "train/loss" in e][-1]
    assert last["train/skipped_steps"] == 2 and math.isfinite(last["train/loss"])


def test_too_many_bad_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, nan_loss_at):
    nan_loss_at(2, 3, 4, 5)
    with pytest.raises(TrainingDiverged, match=r"step 4: 3 non-finite steps in a row.*solver residuals"):
        train(tiny(tmp_path, "transformer_xl", "train.max_steps=8", "train.max_bad_steps=3"))


@pytest.mark.parametrize("args, needle", [
    (["{debug}/transformer_deq.yaml", "train.nope=1"], "nope"),
    (["{debug}/transformer_deq.yaml", "optim.schedule=linear"], "optim.schedule"),
    (["{debug}/transformer_deq.yaml", "train.max_steps=abc"], "max_steps"),
    (["{debug}/transformer_deq.yaml", "train.grad_sync=nccl_magic"], "train.grad_sync"),
    (["{debug}/missing.yaml"], "missing.yaml"),
    (["--resume", "/nonexistent/run"], "/nonexistent/run"),
    (["{debug}/transformer_deq.yaml", "train.log_every=0"], "train.log_every"),
    (["{debug}/transformer_deq.yaml", "train.eval_max_tokens=-1"], "train.eval_max_tokens"),
    (["{debug}/transformer_deq.yaml", "optim.betas=[0.9]"], "optim.betas"),
])
def test_bad_config_gives_a_one_line_error(tmp_path, args, needle):
    args = [a.format(debug=DEBUG) for a in args] + [f"train.run_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "deqlm.train", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("exp", sorted(p.stem for p in DEBUG.glob("*.yaml") if p.stem != "base"))
def test_every_debug_config_trains_a_few_steps(tmp_path, history, exp):
    trainer = train(tiny(tmp_path, exp, "train.max_steps=4", "train.log_every=2", "train.eval_every=4",
                         "model.pretrain_steps=2"))
    assert len(history(trainer)) == 4 and all(math.isfinite(loss) for _, loss in history(trainer))
    assert (trainer.run_dir / "ckpt" / "last.pt").is_file()


def test_the_saved_config_keeps_the_overrides_next_to_the_files_note(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text('name: x\nnote: "d_inner 64 to match the baseline"\nmodel:\n  d_inner: 64\n')
    cfg = load_config(exp, ["model.d_inner=32", "train.max_steps=3"])
    assert cfg.note == "d_inner 64 to match the baseline"
    assert cfg.overrides == ["model.d_inner=32", "train.max_steps=3"]
    save_config(cfg, tmp_path / "config.yaml")
    resumed = load_config(tmp_path / "config.yaml", ["train.max_steps=5"])
    assert resumed.overrides == ["model.d_inner=32", "train.max_steps=3", "train.max_steps=5"]


def test_a_run_that_never_leaves_pretraining_says_so_at_start(tmp_path):
    out = io.StringIO()
    train(tiny(tmp_path, "transformer_deq", "train.max_steps=2", "model.pretrain_steps=2"), stream=out)
    assert "the DEQ solver never runs" in out.getvalue()
    out = io.StringIO()
    train(tiny(tmp_path, "transformer_deq", "train.max_steps=3", "model.pretrain_steps=2"), stream=out)
    assert "never runs" not in out.getvalue()


def test_console_lines_show_only_the_figures_a_model_has(tmp_path):
    out = io.StringIO()
    train(tiny(tmp_path, "transformer_xl", "train.max_steps=2", "train.eval_every=2"), stream=out)
    valid_line = next(line for line in out.getvalue().splitlines() if " valid " in line)
    assert "ppl" in valid_line and "f_max_iter" not in valid_line  # an unrolled model has no solver
    out = io.StringIO()
    copy = tiny(tmp_path, "copy_transformer_deq", "train.max_steps=2", "train.eval_every=2",
                "train.log_every=1")
    train(copy, stream=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("step ")]
    assert lines and not any("ppl" in line for line in lines)  # copy memory: a loss, never a perplexity


def test_state_bytes_count_parameters_gradients_and_both_adam_moments(tmp_path):
    trainer = train(tiny(tmp_path, "transformer_xl", "train.max_steps=2", "train.log_every=1"))
    n_tensors, n_values = len(trainer.params), sum(p.numel() for p in trainer.params)
    events = read_jsonl(trainer.run_dir / "metrics.jsonl")
    logged = [e["mem/state_bytes"] for e in events if "train/loss" in e]
    # fp32 weights, gradients, exp_avg and exp_avg_sq, plus Adam's one-element step counter per tensor
    assert logged[-1] == 4 * 4 * n_values + 4 * n_tensors
