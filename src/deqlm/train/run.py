"""The torch side of `python -m deqlm.train`: train one loaded config; each failure is an exit code.

`deqlm.train.cli` parses the command line and loads the config without torch, then imports this module (so
`--help` and usage errors answer at once); everything the training needs is imported here.
"""

from __future__ import annotations

from pathlib import Path

from deqlm.config import ConfigError, ExperimentConfig
from deqlm.data.errors import DataError
from deqlm.infra import distributed
from deqlm.infra.exits import BAD_INPUT, FAILED, INTERRUPTED, OK, error
from deqlm.infra.io import JsonlError
from deqlm.infra.run_folder import CheckpointError, RunError, WriteFailed
from deqlm.train.checkpoint import NothingToDo
from deqlm.train.signals import Stopped
from deqlm.train.trainer import TrainingDiverged, train


def main(cfg: ExperimentConfig, resume_dir: Path | None = None) -> int:
    """Train `cfg` (into a new run directory, or continuing `resume_dir`); the command's exit code."""
    try:
        train(cfg, resume_dir=resume_dir)
    except (ConfigError, DataError, CheckpointError, JsonlError) as exc:
        return error(str(exc), BAD_INPUT)
    except WriteFailed as exc:  # mid-run: a full disk, a file-size limit
        return error(str(exc), FAILED)
    except RunError as exc:  # before step one: an output folder that cannot take a file, a second writer
        return error(str(exc), BAD_INPUT)
    except OSError as exc:  # a log or config write the disk refused mid-run
        return error(f"cannot write {exc.filename or 'a run file'} ({exc.strerror or exc})", FAILED)
    except NothingToDo as exc:
        print(exc)
        return OK
    except TrainingDiverged as exc:
        return error(str(exc), FAILED)
    except Stopped as exc:
        return error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return error("interrupted (resume with --resume RUN_DIR)", INTERRUPTED)
    finally:
        distributed.cleanup()
    return OK
