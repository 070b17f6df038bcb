"""A checkpoint's weights into a model, and in plain words why they do not fit when they do not.

`load_state_dict` reports a misfit as "Error(s) in loading state_dict for SequenceLM:" and a wall of keys; a
user who resumed with another width, or evaluated a run whose config was edited, needs the first parameter
that differs with both shapes, or which parameters one side has and the other lacks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class WeightsMismatch(ValueError):
    """A state dict that does not fit a model; the message says how, in one line."""


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def describe_mismatch(model_state: Mapping[str, torch.Tensor],
                      saved: Mapping[str, torch.Tensor]) -> str | None:
    """How `saved` fails to fit `model_state` (None when it fits): the first parameter whose shape differs,
    else the parameters only one side has."""
    for name, tensor in model_state.items():
        if name in saved and tuple(saved[name].shape) != tuple(tensor.shape):
            return (f"parameter {name} is {list(saved[name].shape)} in the checkpoint but "
                    f"{list(tensor.shape)} in the model")
    missing = [k for k in model_state if k not in saved]
    unexpected = [k for k in saved if k not in model_state]
    parts = []
    if missing:
        parts.append(f"the model has {len(missing)} parameter(s) the checkpoint lacks ({_few(missing)})")
    if unexpected:
        parts.append(f"the checkpoint has {len(unexpected)} the model lacks ({_few(unexpected)})")
    return "; ".join(parts) or None


def load_weights(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict(saved)`, or WeightsMismatch naming the misfit before anything is copied."""
    why = describe_mismatch(model.state_dict(), saved)
    if why is not None:
        raise WeightsMismatch(why)
    model.load_state_dict(saved)
