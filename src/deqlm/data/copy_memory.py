"""The copy-memory task (REFERENCE.md §1; the TCN repository's convention).

A sample has length T+20. Input: x1..x10 uniform in {1..8}, then T-1 zeros, then the marker 9 on the last 11
positions. Target: 0 everywhere except the last 10 positions, which must reproduce x1..x10. Loss is 10-class
cross-entropy over all positions. Samples are independent, so no memory is carried between batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from deqlm.data.errors import DataError
from deqlm.data.iterators import parse_position

N_COPY = 10  # symbols to remember
MARKER = 9  # "recall now" input symbol
N_SYMBOLS = 10  # inputs and classes 0..9


def make_copy_memory(n: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples ``(x_NL, y_NL)`` int64 with L = T + 20, deterministic in ``seed``."""
    if T < 1 or n < 1:
        raise DataError(f"copy memory needs T >= 1 and n >= 1, got T={T}, n={n}")
    rng = np.random.default_rng(seed)
    seq_NC = rng.integers(1, 9, size=(n, N_COPY))
    L = T + 2 * N_COPY
    x_NL = np.zeros((n, L), dtype=np.int64)
    y_NL = np.zeros((n, L), dtype=np.int64)
    x_NL[:, :N_COPY] = seq_NC
    x_NL[:, L - N_COPY - 1 :] = MARKER
    y_NL[:, L - N_COPY :] = seq_NC
    return x_NL, y_NL


class ShuffledIterator:
    """Endless training batches of whole samples, reshuffled each epoch with ``seed + epoch``.

    The shuffle is a function of (seed, epoch) only, so ``{epoch, position}`` is a complete resume state.
    The last partial batch of an epoch is dropped (fixed shapes). Under DDP, rank r takes rows
    ``[r*B/W, (r+1)*B/W)`` of every global batch.
    """

    def __init__(self, x_NL: np.ndarray, y_NL: np.ndarray, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size <= 0 or batch_size % world_size or not 0 <= rank < world_size:
            raise DataError(f"batch_size={batch_size} must be positive and divisible by "
                            f"world_size={world_size} (rank={rank})")
        if batch_size > len(x_NL):
            raise DataError(f"batch_size={batch_size} exceeds the {len(x_NL)} training samples")
        self.x_NL, self.y_NL = x_NL, y_NL
        self.batch_size, self.seed = batch_size, seed
        per_rank = batch_size // world_size
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)
        self.n_batches = len(x_NL) // batch_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x_NL))
            self._perm_epoch = self.epoch
        return self._perm

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.n_batches:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        idx = self._permutation()[start : start + self.batch_size][self.rows]
        self.position += 1
        return torch.from_numpy(self.x_NL[idx]), torch.from_numpy(self.y_NL[idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = parse_position(state, self.n_batches)


class CopyMemoryDataset:
    """Copy memory as a Dataset: inputs 0..9 (vocab_size 10), 10 classes, no memory across batches."""

    name = "copy"
    carry_mems = False
    vocab_size = N_SYMBOLS
    n_classes = N_SYMBOLS
    entropy_rate = None
    corpus_dir = None
    tokenizer = "copy"

    def __init__(self, T: int = 400, n_train: int = 20000, n_test: int = 2000, n_valid: int = 2000,
                 seed: int = 1111):
        self.T, self.seed = T, seed
        self.train_x_NL, self.train_y_NL = make_copy_memory(n_train, T, seed)
        # separate streams: the test set does not change when n_train does, and validation (which picks the
        # best checkpoint) never sees it (the paper's task has train and test only)
        self.test_x_NL, self.test_y_NL = make_copy_memory(n_test, T, seed + 1_000_003)
        self.valid_x_NL, self.valid_y_NL = make_copy_memory(n_valid, T, seed + 2_000_003)
        self.vocab_hash = f"copy-T{T}"

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            return self.train_x_NL, self.train_y_NL
        if split == "valid":
            return self.valid_x_NL, self.valid_y_NL
        if split == "test":
            return self.test_x_NL, self.test_y_NL
        raise DataError(f"split={split!r} is not one of train, valid, test")

    def split_tokens(self, split: str) -> int:
        return int(self._split(split)[1].size)

    def split_words(self, split: str) -> int:
        return self.split_tokens(split)

    def train_iterator(self, batch_size: int, tgt_len: int = 0, rank: int = 0, world_size: int = 1):
        """``tgt_len`` is ignored: a batch holds whole sequences of length T+20."""
        return ShuffledIterator(self.train_x_NL, self.train_y_NL, batch_size, self.seed, rank, world_size)

    def eval_batches(self, split: str, batch_size: int, tgt_len: int = 0) -> Iterator:
        """The whole split in order, in batches of whole sequences (the last one may be smaller)."""
        x_NL, y_NL = self._split(split)
        if batch_size <= 0:
            raise DataError(f"batch_size={batch_size} must be positive")
        rows = [slice(start, start + batch_size) for start in range(0, len(x_NL), batch_size)]
        return ((torch.from_numpy(x_NL[r]), torch.from_numpy(y_NL[r])) for r in rows)

    def check_vocab_hash(self, expected: str) -> None:
        if expected != self.vocab_hash:
            raise DataError(f"task mismatch: checkpoint has {expected}, dataset is {self.vocab_hash}")
