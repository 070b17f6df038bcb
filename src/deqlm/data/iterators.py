"""Ordered language-model batches with Transformer-XL semantics, split over DDP ranks.

The token stream of a split is cut into ``batch_size`` contiguous columns (column b holds tokens
``[b*S, (b+1)*S)``, S = len // batch_size; the remainder is dropped), and walked left to right in segments of
``tgt_len``: ``x = col[:, i:i+L]``, ``y = col[:, i+1:i+1+L]``. Segment k+1 of a column continues exactly where
segment k stopped, so a model may carry its memory from one batch to the next. Every target token of the
columns (positions 1..S-1) is seen exactly once per pass when the last, short segment is kept (evaluation);
training drops that short segment so every batch has the same shape.

Under DDP, rank r of W takes columns ``[r*B/W, (r+1)*B/W)``: the union over ranks is the single-process batch.

``ShuffledIterator`` is copy memory's: whole independent samples, reshuffled each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from deqlm.data.errors import DataError


def rank_columns(ids: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The columns ``[B/W, S]`` of this rank, as a view of ``ids`` (a memmap stays a memmap)."""
    if batch_size <= 0 or world_size <= 0:
        raise DataError(f"batch_size={batch_size} and world_size={world_size} must be positive")
    if batch_size % world_size:
        raise DataError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is outside [0, {world_size})")
    n_step = len(ids) // batch_size
    if n_step < 2:
        raise DataError(f"{len(ids)} tokens cannot fill {batch_size} columns of at least 2 tokens")
    per_rank = batch_size // world_size
    cols = ids[: n_step * batch_size].reshape(batch_size, n_step)
    return cols[rank * per_rank : (rank + 1) * per_rank]


class LMOrderedIterator:
    """Yields ``(x_BL, y_BL)`` LongTensors, B = batch_size / world_size.

    ``loop=True`` (training) walks the columns epoch after epoch without end, full segments only;
    ``state_dict() = {"epoch", "position"}`` names the next batch, and ``load_state_dict`` resumes there.
    ``loop=False`` (evaluation) makes one pass and keeps the last short segment.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, tgt_len: int, rank: int = 0, world_size: int = 1,
                 loop: bool = True):
        if tgt_len <= 0:
            raise DataError(f"tgt_len={tgt_len} must be positive")
        self.cols_BS = rank_columns(ids, batch_size, rank, world_size)
        self.tgt_len = tgt_len
        self.loop = loop
        n_targets = self.cols_BS.shape[1] - 1
        self.n_segments = n_targets // tgt_len if loop else -(-n_targets // tgt_len)
        if self.n_segments == 0:
            raise DataError(f"a split of {len(ids)} tokens has no full segment of tgt_len={tgt_len} "
                            f"in {batch_size} columns; lower batch_size or tgt_len")
        self.epoch = 0
        self.position = 0  # index of the next segment within the epoch

    def __len__(self) -> int:
        """Segments per epoch (per pass)."""
        return self.n_segments

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.n_segments:
            if not self.loop:
                raise StopIteration
            self.epoch += 1
            self.position = 0
        start = self.position * self.tgt_len
        end = min(start + self.tgt_len, self.cols_BS.shape[1] - 1)
        x_BL = torch.from_numpy(self.cols_BS[:, start:end].astype(np.int64))
        y_BL = torch.from_numpy(self.cols_BS[:, start + 1 : end + 1].astype(np.int64))
        self.position += 1
        return x_BL, y_BL

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = parse_position(state, self.n_segments)


def parse_position(state: dict, n_batches: int) -> tuple[int, int]:
    """(epoch, position) of a saved iterator state, checked against `n_batches` batches per epoch."""
    if set(state) != {"epoch", "position"}:
        raise DataError(f"iterator state must have keys epoch and position, got {sorted(state)}")
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position <= n_batches:
        raise DataError(f"iterator state {state} is outside {n_batches} batches per epoch")
    return epoch, position


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
