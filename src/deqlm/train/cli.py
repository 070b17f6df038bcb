"""Command line of the trainer: parse, load the config, train; one-line errors instead of tracebacks."""

from __future__ import annotations

import sys
from pathlib import Path

from deqlm import config_reference
from deqlm.config import ConfigError, load_config
from deqlm.infra.exits import BAD_INPUT, OK, error
from deqlm.infra.run_folder import LAST, RunFolder

USAGE = ("usage: python -m deqlm.train EXPERIMENT.yaml [key=value ...]\n"
         "       python -m deqlm.train --resume RUN_DIR [key=value ...]")
ABOUT = """\
Trains one experiment into a new run directory under train.run_dir; --resume continues RUN_DIR from its
last checkpoint. Each setting comes from, last one winning: the defaults below, the experiment file (and the
files its `base:` names), WANDB_MODE in the environment (log.wandb_mode only), key=value on the command line.

example (seconds on a CPU, the embedded synthetic corpus, no download):
  python -m deqlm.train experiments/debug/transformer_deq.yaml train.max_steps=20 train.log_every=5
  python -m deqlm.train --resume results/runs/synthetic/debug_transformer_deq/STAMP train.max_steps=40"""
MORE = ("More in docs/training.md: the run directory, the metrics, resuming, multi-GPU, and the exit codes\n"
        "(0 ok, 1 the run failed, 2 bad input, 128+N stopped by signal N after saving a checkpoint).")


def help_text() -> str:
    """The full `--help`: usage, a worked example and every setting with its default and meaning."""
    return "\n\n".join([USAGE, ABOUT, "settings (key=default  meaning):", config_reference.render(), MORE])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return OK
    if not argv:
        return error(f"no experiment given ({USAGE[7:].splitlines()[0]}; --help lists every setting)",
                     BAD_INPUT)

    resume_dir = folder = None
    if argv[0] == "--resume":
        if len(argv) < 2:
            return error("--resume needs a run directory", BAD_INPUT)
        resume_dir, overrides = Path(argv[1]), argv[2:]
        folder = RunFolder(resume_dir)
        if not folder.checkpoint_path(LAST).is_file():
            return error(f"{resume_dir}: no checkpoint {folder.checkpoint_label(LAST)} to resume from",
                         BAD_INPUT)
    else:
        overrides = argv[1:]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        return error(f"unknown option {flags[0]!r} ({USAGE.splitlines()[0][7:]}; --help for more)", BAD_INPUT)
    try:
        cfg = folder.resume_config(overrides) if folder else load_config(Path(argv[0]), overrides)
    except ConfigError as exc:
        return error(str(exc), BAD_INPUT)

    # the training loads torch: imported only once the command line is understood, so that --help and usage
    # errors answer at once
    from deqlm.train import run

    return run.main(cfg, resume_dir)
