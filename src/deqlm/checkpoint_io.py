"""Checkpoint files of a run directory: where they live, what they are called, and the one way to read them.

Both the trainer (resume) and the evaluator (best or last weights) read checkpoints, and neither may import
the other, so the names and the loader live here; writing and the training state stay in
`deqlm.train.checkpoint`. Importing this module does not load torch (`--help` of every entry point answers
before torch is imported); reading a checkpoint does.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

CKPT_DIR = "ckpt"  # <run_dir>/ckpt/ holds the checkpoints
LAST = "last.pt"  # the latest state: what a resume continues from
BEST = "best.pt"  # the state with the best validation perplexity so far


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: cut short (a full disk, an interrupted copy), not a checkpoint,
    or holding objects other than tensors and plain data. The message names the file, then says what to do."""

    def __init__(self, path: Path, reason: str, advice: str = ""):
        super().__init__(f"{path} is damaged ({reason})" + (f"; {advice}" if advice else ""))
        self.path, self.reason = path, reason


def checkpoint_path(run_dir: str | os.PathLike, name: str) -> Path:
    """`<run_dir>/ckpt/<name>`, for `name` one of LAST, BEST."""
    return Path(run_dir) / CKPT_DIR / name


def _why_unreadable(exc: Exception, path: Path) -> str:
    """What went wrong, in words a user can act on (torch's own messages run to several sentences)."""
    if isinstance(exc, EOFError) or path.stat().st_size == 0:
        return "empty or cut short"
    if isinstance(exc, pickle.UnpicklingError):
        return "not a checkpoint of tensors and plain data"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first.split(". ")[0]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True (a checkpoint can hold data, never code); CheckpointError if unreadable."""
    # torch loads here, not at the top: the command lines import this module before their --help answers
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(path, _why_unreadable(exc, path)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(path, "no model state in it")
    return state
