"""Shared test setup: a fixed thread count (CI machines are small and shared), a seed per test, the
record of the training steps a trainer applied (`history`), and a private copy of a module's finished run
(`run`)."""

import shutil
from pathlib import Path

import pytest
import torch

from deqlm.train.trainer import Trainer

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def history(monkeypatch):
    """`history(trainer)`: the (step, loss) of every step that trainer applied (skipped steps left out), in
    order. Recorded around `Trainer.train_step` here, so the production loop keeps no list for the tests."""
    applied: dict[object, list[tuple[int, float]]] = {}
    real_step = Trainer.train_step

    def recording_step(self, measure_activation):
        out = real_step(self, measure_activation)
        if not out["bad"]:
            applied.setdefault(self, []).append((self.step, out["loss"]))
        return out

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    return lambda trainer: applied.get(trainer, [])


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the test module's `finished_run` folder, free to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))
