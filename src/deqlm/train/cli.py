"""Command line of the trainer: parse, load the config, train; one-line errors instead of tracebacks."""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = ("usage: python -m deqlm.train EXPERIMENT.yaml [key=value ...]\n"
         "       python -m deqlm.train --resume RUN_DIR [key=value ...]")


def _error(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from deqlm.config import ConfigError, load_config

    resume_dir = None
    if argv[0] == "--resume":
        if len(argv) < 2:
            return _error("--resume needs a run directory", 2)
        resume_dir, overrides = Path(argv[1]), argv[2:]
        config_path = resume_dir / "config.yaml"
        if not (resume_dir / "ckpt" / "last.pt").is_file():
            return _error(f"{resume_dir}: no checkpoint ckpt/last.pt to resume from", 2)
    else:
        config_path, overrides = Path(argv[0]), argv[1:]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        return _error(f"unknown option {flags[0]!r} ({USAGE.splitlines()[0][7:]})", 2)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        return _error(str(exc), 2)

    from deqlm.data.errors import DataError
    from deqlm.train import distributed
    from deqlm.train.trainer import TrainingDiverged, train

    try:
        train(cfg, resume_dir=resume_dir)
    except (ConfigError, DataError) as exc:
        return _error(str(exc), 2)
    except TrainingDiverged as exc:
        return _error(str(exc), 1)
    except KeyboardInterrupt:
        return _error("interrupted (resume with --resume RUN_DIR)", 130)
    finally:
        distributed.cleanup()
    return 0
