"""Which dtype arithmetic runs in, decided in one place.

Half-precision tensors (autocast) are lifted to float32 where rounding would hurt (softmaxes, solver algebra),
but a float64 model stays float64 end to end: its loss, gradients and solver states are all float64, which
the gradient tests and the reversible solver's reconstruction depend on.
"""

from __future__ import annotations

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything else (never half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """`t` in its working dtype: half precision becomes float32, float32 and float64 are left as they are."""
    return t.to(working_dtype(t.dtype))
