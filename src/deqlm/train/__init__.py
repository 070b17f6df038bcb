"""Training: `python -m deqlm.train EXPERIMENT.yaml [key=value ...]` or `--resume RUN_DIR`."""

from deqlm.train.trainer import Trainer, TrainingDiverged, evaluate, train

__all__ = ["Trainer", "TrainingDiverged", "evaluate", "train", "main"]


def main(argv: list[str] | None = None) -> int:
    from deqlm.train.cli import main as _main

    return _main(argv)
