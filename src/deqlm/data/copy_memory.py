"""The copy-memory task (docs/paper.md §1; the TCN repository's convention).

A sample has length T+20. Input: x1..x10 uniform in {1..8}, then T-1 zeros, then the marker 9 on the last 11
positions. Target: 0 everywhere except the last 10 positions, which must reproduce x1..x10. Loss is 10-class
cross-entropy over all positions. Samples are independent, so no memory is carried between batches.

This module is the task itself (numpy, no torch), so `python -m deqlm.data inspect` can describe it; the
dataset that hands it out as torch batches is ``CopyMemoryDataset`` in dataset.py.
"""

from __future__ import annotations

import numpy as np

from deqlm.data.errors import DataError

N_COPY = 10  # symbols to remember
MARKER = 9  # "recall now" input symbol
N_SYMBOLS = 10  # inputs and classes 0..9


def make_copy_memory(n: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples ``(x_NL, y_NL)`` int64 with L = T + 20, deterministic in ``seed``."""
    if T < 1 or n < 1:
        raise DataError(f"copy memory needs T >= 1 and n >= 1, got T={T}, n={n}")
    rng = np.random.default_rng(seed)
    seq_NC = rng.integers(1, 9, size=(n, N_COPY))
    L = sequence_length(T)
    x_NL = np.zeros((n, L), dtype=np.int64)
    y_NL = np.zeros((n, L), dtype=np.int64)
    x_NL[:, :N_COPY] = seq_NC
    x_NL[:, L - N_COPY - 1 :] = MARKER
    y_NL[:, L - N_COPY :] = seq_NC
    return x_NL, y_NL


def sequence_length(T: int) -> int:
    """Length of one sample: the symbols, T-1 blanks, the marker run and the recalled symbols."""
    return T + 2 * N_COPY


def copy_memory_summary(T: int, n_train: int, n_valid: int, n_test: int) -> dict:
    """The figures ``python -m deqlm.data inspect`` prints: every position of every sample is a target."""
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    return {"dataset": "copy", "vocab_size": N_SYMBOLS,
            **{f"{split}_tokens": n * sequence_length(T) for split, n in sizes.items()},
            "oov_valid": 0, "oov_test": 0}
