"""The command lines as a user meets them: help before torch, wandb only when asked, one exit convention."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqlm.config import ConfigError, ExperimentConfig, load_config
from deqlm.eval import cli as eval_cli
from deqlm.eval import report
from deqlm.infra import exits
from deqlm.infra.metrics import MetricLogger
from deqlm.infra.run_folder import WANDB_ID
from deqlm.train import cli as train_cli

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "experiments" / "debug"
ENTRY_POINTS = [
    ["-m", "deqlm.train"], ["-m", "deqlm.eval"], ["-m", "deqlm.eval.report"], ["-m", "deqlm.bench"],
    ["-m", "deqlm.bench", "solver"], ["-m", "deqlm.bench", "memory"], ["-m", "deqlm.bench", "speed"],
    ["-m", "deqlm.bench", "allocator"], ["-m", "deqlm.demo"], ["-m", "deqlm.params"], ["-m", "deqlm.data"],
    ["-m", "deqlm.data", "inspect"], ["-m", "deqlm.sample"],
    *[[str(p.relative_to(ROOT))] for p in sorted((ROOT / "scripts").glob("*.py"))],
]


def _env_without_wandb() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------
# --help


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` (lines 'import time: self | cumulative | name')."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:")}


@pytest.mark.parametrize("command", ENTRY_POINTS, ids=lambda c: " ".join(c).replace("-m ", ""))
def test_help_answers_before_torch_is_imported(command):
    proc = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=_env_without_wandb())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
    assert "torch" not in _imported_modules(proc.stderr)


def test_train_help_lists_every_setting_with_its_default_and_meaning():
    text = train_cli.help_text()
    for section in dataclasses.fields(ExperimentConfig):
        sub = section.default_factory() if callable(section.default_factory) else None
        if not dataclasses.is_dataclass(sub):
            continue
        assert f"\n{section.name}: " in text
        for f in dataclasses.fields(sub):
            line = next(ln for ln in text.splitlines() if ln.startswith(f"  {section.name}.{f.name}="))
            assert len(line.split(None, 1)) == 2, f"{section.name}.{f.name} has no meaning in the help"
    for setting in ("deq.f_max_iter=30", "train.max_steps=1000", "log.wandb_mode=disabled",
                    "optim.lr=0.00025", "model.weight_tied=false", "optim.betas=[0.9, 0.999]"):
        assert f"  {setting} " in text
    assert "forward solver step cap" in text and "docs/training.md" in text
    assert "python -m deqlm.train experiments/debug/" in text  # the worked example


# ---------------------------------------------------------------------------------------------------------
# wandb only when asked


def test_wandb_mode_precedence_command_line_over_environment_over_file(tmp_path):
    on_file = tmp_path / "on.yaml"
    on_file.write_text(f"base: {DEBUG / 'transformer_xl.yaml'}\nlog: {{wandb_mode: offline}}\n")
    plain = DEBUG / "transformer_xl.yaml"

    def mode(path, env, overrides=()):
        return load_config(path, list(overrides), env=env).log.wandb_mode

    assert mode(plain, {}) == "disabled"  # the experiment files leave it off
    assert mode(plain, {"WANDB_MODE": "offline"}) == "offline"  # the environment turns a disabled file on
    assert mode(on_file, {}) == "offline"
    assert mode(on_file, {"WANDB_MODE": "disabled"}) == "disabled"  # the environment wins over the file
    # the command line wins over both
    assert mode(on_file, {"WANDB_MODE": "disabled"}, ["log.wandb_mode=online"]) == "online"
    assert mode(plain, {"WANDB_MODE": "online"}, ["log.wandb_mode=disabled"]) == "disabled"
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        mode(plain, {"WANDB_MODE": "dryrun-ish"})


def test_training_not_asked_for_wandb_never_imports_or_starts_it(tmp_path):
    code = ("import sys\nfrom deqlm.train.cli import main\nrc = main(sys.argv[1:])\n"
            "print('wandb imported:', 'wandb' in sys.modules)\nsys.exit(rc)")
    args = [str(DEBUG / "transformer_xl.yaml"), f"train.run_dir={tmp_path}", "train.max_steps=2",
            "train.log_every=1", "train.eval_every=0", "log.progress=false", "train.threads=1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=_env_without_wandb())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wandb imported: False" in proc.stdout
    run_dir = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("run_dir: "))[9:])
    assert not (run_dir / "wandb").exists() and not (run_dir / WANDB_ID).exists()
    assert "wandb" not in (proc.stdout + proc.stderr).replace("wandb imported", "")


def test_wandb_when_asked_prints_no_banner_or_history_only_where_its_run_is(tmp_path, capfd, monkeypatch):
    pytest.importorskip("wandb")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    logger = MetricLogger(tmp_path, wandb_mode="offline", run_name="t", progress=False)
    for step in range(1, 4):
        logger.log({"step": step, "train/loss": 1.0 / step})
    logger.close()
    out, err = capfd.readouterr()
    assert [ln for ln in (out + err).splitlines() if "wandb" in ln.lower()] == []
    assert logger.wandb_note.startswith("wandb: offline run ") and str(tmp_path) in logger.wandb_note
    assert (tmp_path / WANDB_ID).exists()


# ---------------------------------------------------------------------------------------------------------
# exit codes and error lines


def test_same_kind_of_error_gives_the_same_exit_code_in_every_entry_point(tmp_path, capsys):
    missing = tmp_path / "no_such_thing"
    assert train_cli.main([str(missing)]) == exits.BAD_INPUT
    assert eval_cli.main([str(missing)]) == exits.BAD_INPUT
    assert report.main([str(missing)]) == exits.BAD_INPUT
    assert train_cli.main([str(DEBUG / "transformer_xl.yaml"), "deq.no_such_key=1"]) == exits.BAD_INPUT
    assert eval_cli.main([str(tmp_path), "no_such_setting=1"]) == exits.BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)


def test_long_error_message_is_printed_whole_on_one_line(tmp_path, capsys):
    deep = tmp_path.joinpath(*[f"a_rather_long_folder_name_{i}" for i in range(12)], "run")
    assert eval_cli.main([str(deep)]) == exits.BAD_INPUT
    assert str(deep) in capsys.readouterr().err
    message = "first line " + "x" * 300 + "\n  second line says what to do"
    assert exits.error(message, exits.FAILED) == exits.FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x" * 300 in err and err.rstrip().endswith("says what to do")
