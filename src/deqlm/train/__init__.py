"""Training: `python -m deqlm.train EXPERIMENT.yaml [key=value ...]` or `--resume RUN_DIR`."""

__all__ = ["Trainer", "TrainingDiverged", "train", "main"]

# The trainer loads torch, and `python -m deqlm.train` imports this package before its __main__: the trainer's
# names are looked up on first use (PEP 562) so that `--help` answers without loading torch.
_TRAINER_NAMES = ("Trainer", "TrainingDiverged", "train")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from deqlm.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'deqlm.train' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    from deqlm.train.cli import main as _main

    return _main(argv)
