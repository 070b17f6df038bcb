"""Faults of a run's output, each one line and a non-zero exit with nothing already written lost: a run folder
that cannot be made, a second writer, a stale lock, a resume or a checkpoint that does not fit the model
(named), and a disk that fills while a checkpoint is written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqlm.eval.cli import main as eval_main
from deqlm.infra import run_folder
from deqlm.infra.run_folder import RunError, RunFolder
from deqlm.models.weights import describe_mismatch
from deqlm.train.cli import main as train_main
from test_faults import DEBUG, one_error_line, snapshot, train_debug_run
from test_faults import TINY as FAULT_TINY

# checkpoints at every step: a resume's first save is the one a full disk interrupts
TINY = [*FAULT_TINY[:-2], "train.ckpt_every=1", "train.eval_max_tokens=200"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return train_debug_run(tmp_path_factory.mktemp("runs"), TINY)


def test_a_run_dir_that_cannot_hold_a_folder_stops_before_the_model_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    args = [str(DEBUG / "transformer_xl.yaml"), f"train.run_dir={blocker}", "train.max_steps=2", *TINY]
    assert train_main(args) == 2
    line = one_error_line(capsys)
    assert str(blocker) in line and "cannot create run folders" in line and "train.run_dir" in line
    assert blocker.read_text() == "not a folder\n"


def test_a_second_trainer_on_a_held_folder_is_refused_naming_the_holder(run, capsys):
    holder = RunFolder(run)
    holder.claim()
    before = snapshot(run)
    try:
        assert train_main(["--resume", str(run), "train.max_steps=4"]) == 2
    finally:
        holder.release()
    assert f"process {os.getpid()} is training this run folder" in one_error_line(capsys)
    assert snapshot(run) == before


def test_a_stale_lock_left_by_a_killed_process_does_not_block_a_resume(run, capsys):
    (run / run_folder.LOCK).write_text("999999\n")  # written, never held: its process is gone
    assert train_main(["--resume", str(run), "train.max_steps=3"]) == 0
    assert RunFolder(run).load_resume_checkpoint()["step"] == 3
    assert (run / run_folder.LOCK).read_text() == f"{os.getpid()}\n"


def test_a_folder_being_trained_can_still_be_evaluated(run):
    holder = RunFolder(run)
    holder.claim()
    try:
        assert eval_main([str(run), "split=test", "max_tokens=200"]) == 0
    finally:
        holder.release()


def test_a_resume_that_changes_the_model_names_each_changed_setting_and_writes_nothing(run, capsys):
    before = snapshot(run)
    assert train_main(["--resume", str(run), "train.max_steps=4", "model.d_inner=40"]) == 2
    line = one_error_line(capsys)
    saved = RunFolder(run).config().model.d_inner
    assert f"model.d_inner {saved} -> 40" in line and "in the checkpoint but" in line
    assert snapshot(run) == before


def test_a_checkpoint_that_does_not_fit_its_config_names_the_parameter_and_both_shapes(run, capsys):
    config = run / run_folder.CONFIG
    d_inner = RunFolder(run).config().model.d_inner
    config.write_text(config.read_text().replace(f"d_inner: {d_inner}", f"d_inner: {d_inner + 8}"))
    before = snapshot(run)
    assert eval_main([str(run), "split=test"]) == 2
    line = one_error_line(capsys)
    assert "does not fit the config's model (parameter " in line
    assert f"[{d_inner}" in line.split(" in the checkpoint but ")[0]
    assert f"[{d_inner + 8}" in line.split(" in the checkpoint but ")[1]
    assert snapshot(run) == before


def test_missing_and_unexpected_parameters_are_named_in_plain_words():
    model = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(3)}
    saved = {"a.weight": torch.zeros(2), "c.weight": torch.zeros(3)}
    assert describe_mismatch(model, saved) == (
        "the model has 1 parameter(s) the checkpoint lacks (b.weight); "
        "the checkpoint has 1 the model lacks (c.weight)")
    assert describe_mismatch(model, dict(model)) is None


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_good_one_and_stops_in_one_line(
        run, capsys, monkeypatch, code):
    good = RunFolder(run).load_resume_checkpoint()["step"]
    real_save = torch.save

    def full(obj, fh, *args, **kwargs):
        real_save({"half": torch.zeros(10)}, fh)  # some bytes reach the temp file, then the disk is full
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", full)
    assert train_main(["--resume", str(run), "train.max_steps=4"]) == 1
    line = one_error_line(capsys)
    assert os.strerror(code) in line and "the last checkpoint written whole is kept" in line
    monkeypatch.setattr(torch, "save", real_save)
    assert RunFolder(run).load_resume_checkpoint()["step"] == good
    assert not [p for p in (run / run_folder.CKPT_DIR).iterdir() if p.name.startswith(".")]


def test_a_start_that_fails_before_its_first_file_leaves_no_empty_run_folder(tmp_path, capsys):
    args = [str(DEBUG / "transformer_xl.yaml"), f"train.run_dir={tmp_path / 'runs'}", "train.max_steps=2",
            "data.dataset=ptb", f"data.data_dir={tmp_path / 'nowhere'}", *TINY]
    assert train_main(args) == 2
    assert "no ptb corpus" in one_error_line(capsys)
    assert not run_folder.discover_runs(tmp_path / "runs")


def test_claiming_a_folder_twice_in_one_process_is_refused_too(tmp_path):
    first = RunFolder(tmp_path)
    first.claim()
    try:
        with pytest.raises(RunError, match=f"process {os.getpid()}"):
            RunFolder(tmp_path).claim()
    finally:
        first.release()
    RunFolder(tmp_path).claim()  # released: free again


def test_a_real_file_size_limit_during_a_checkpoint_is_the_os_error_and_the_old_checkpoint_stays(tmp_path):
    """torch's writer reports a refused write as its own RuntimeError; the run folder hands on the OSError."""
    child = f"""
import errno, resource, torch
from deqlm.infra.run_folder import RunFolder
folder = RunFolder({str(tmp_path)!r})
folder.ckpt_dir.mkdir()
folder.save_checkpoint("last.pt", {{"model": {{"w": torch.ones(10)}}, "step": 1}})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
try:
    folder.save_checkpoint("last.pt", {{"model": {{"w": torch.ones(1 << 16)}}, "step": 2}})
except OSError as exc:
    print("errno", exc.errno == errno.EFBIG)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "errno True", proc.stderr[-1000:]
    assert RunFolder(tmp_path).load_resume_checkpoint()["step"] == 1
    assert [p.name for p in (tmp_path / run_folder.CKPT_DIR).iterdir()] == [run_folder.LAST]


def test_a_new_run_whose_folder_fails_its_write_test_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def refuse(self, where):
        raise RunError(where, "cannot write there (Read-only file system)")

    monkeypatch.setattr(RunFolder, "_test_write", refuse)
    args = [str(DEBUG / "transformer_xl.yaml"), f"train.run_dir={tmp_path / 'runs'}", "train.max_steps=2",
            *TINY]
    assert train_main(args) == 2
    assert "Read-only file system" in one_error_line(capsys)
    assert not run_folder.discover_runs(tmp_path / "runs")
