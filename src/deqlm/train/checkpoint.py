"""Checkpoints that survive a kill at any moment and resume bitwise.

A checkpoint is a dict of tensors, numbers, strings and containers only (it loads with
`torch.load(weights_only=True)`), written through a temp file + rename (`deqlm.infra.io.atomic_torch_save`):

    model, optimizer, scheduler, scaler      state dicts
    step                                     last completed step
    data_state                               the training iterator's position
    rng                                      torch / numpy / python / cuda generator states (dropout included)
    mems                                     carried segment memory (tensors), for bitwise resume
    config                                   the resolved config as a plain dict
    vocab_hash, best_valid_ppl, wandb_id     identity checks and bookkeeping
    train_state                              counters of the loop (tokens, elapsed time, skipped steps, ...)

Where checkpoints live, and how they are written and read, is `deqlm.infra.run_folder`'s, shared with the
evaluator; this module holds what a training state is made of.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch

from deqlm.infra.run_folder import RunFolder


class NothingToDo(Exception):
    """A resume whose checkpoint is already at `train.max_steps`: not an error, and nothing gets written
    (the lock file aside)."""


def rng_state() -> dict:
    """Every generator a training step draws from, as tensors and lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    pyst = state["python"]
    random.setstate((pyst["version"], tuple(pyst["state"]), pyst["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj: Any) -> Any:
    """Detached CPU copies of every tensor in a nested container (mems, data state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def open_for_resume(folder: RunFolder, max_steps: int, is_main: bool = True, stream=None) -> dict:
    """The state to resume `run_dir` from, read before anything is built or written, so that a damaged
    checkpoint (CheckpointError) or a run already at `max_steps` (NothingToDo) leaves the run as it was.
    Temp files that interrupted checkpoint writes left behind are removed first (nothing writes them now)
    and said so on `stream`."""
    n_files, n_bytes = folder.remove_checkpoint_temps() if is_main else (0, 0)
    if n_files:
        print(f"removed {n_files} temp file(s) ({n_bytes / 2**20:.1f} MiB) left in {folder.ckpt_dir} by an "
              "interrupted checkpoint write", file=stream or sys.stdout, flush=True)
    state = folder.load_resume_checkpoint()
    if int(state["step"]) >= max_steps:
        raise NothingToDo(f"{folder} is already at step {state['step']} (train.max_steps={max_steps}): "
                          "nothing to do; raise train.max_steps to train on")
    return state
