"""Shared test setup: a fixed thread count (CI machines are small and shared) and a seed per test."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0
