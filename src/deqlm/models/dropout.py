"""Stabilisers that keep a DEQ's map f one fixed function: variational dropout, weight norm, DropConnect.

A DEQ solves z* = f(z*; x). If f redrew dropout masks or DropConnect noise at every solver step it would be a
different map each time and there would be no fixed point to find. So every random or derived tensor is made
once per model forward:

* `VariationalDropout.mask(...)` draws a mask the caller holds for the whole forward (all solver steps).
* Weight norm uses `torch.nn.utils.parametrizations.weight_norm`; `SequenceLM.forward` runs the core inside
  `torch.nn.utils.parametrize.cached()` after `fill_parametrization_cache`, so w = g v / ||v|| is computed
  once per forward (with autograd on, so gradients still reach g and v) and not once per solver step.
* `DropConnect` is a parametrization stacked on top of weight norm; under the same cache its mask is fixed for
  the forward, like the official `WeightDrop` but without deleting and re-registering parameters.

Legend: B batch, L length, D features.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per forward and broadcast over time (Gal & Ghahramani 2016).

    `mask(shape, like)` returns a scaled Bernoulli mask of `shape` (use 1 on the time axis so it is shared
    by all positions), or None when inactive (eval mode or p == 0); `apply_mask` treats None as identity.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def mask(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.p == 0.0:
            return None
        keep = 1.0 - self.p
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class DropConnect(nn.Module):
    """Parametrization: Bernoulli(1-p) noise on a weight tensor (Wan et al. 2013; TrellisNet's wdrop).

    `torch.native_dropout` keeps a one-byte mask for backward on every device; `F.dropout` on a CPU keeps a
    float32 one, four times the bytes of a weight-sized tensor stored per forward (docs/models.md)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropConnect p={p!r} must lie in [0, 1)")
        self.p = float(p)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return w
        return torch.native_dropout(w, self.p, True)[0]


def add_weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """w = g v / ||v|| per output unit (Salimans & Kingma 2016); g and v become
    parametrizations.original0/1."""
    return weight_norm(module, name=name, dim=dim)


def add_dropconnect(module: nn.Module, p: float, name: str = "weight") -> nn.Module:
    if p > 0.0:
        parametrize.register_parametrization(module, name, DropConnect(p))
    return module


def fill_parametrization_cache(module: nn.Module) -> None:
    """Compute every parametrized tensor once inside an active `parametrize.cached()` (caller's grad mode).

    Called before the solver: otherwise the first access could happen under the solver's `torch.no_grad()`,
    and the cached weight would then carry no graph back to weight_g / weight_v.
    """
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in sub.parametrizations:
                getattr(sub, name)


def weights_read(module: nn.Module) -> list[torch.Tensor]:
    """The weights `module` reads in a forward inside an active `parametrize.cached()`: each parametrized
    tensor as cached (the weight-normed or DropConnect'd weight, not the originals it is computed from) and
    every plain parameter. A layer that differentiates f without its stored graph (the reversible DEQ) takes
    its gradients with respect to exactly these tensors; autograd carries them on to the originals."""
    tensors: list[torch.Tensor] = []
    for sub in module.modules():
        if isinstance(sub, parametrize.ParametrizationList):
            continue  # the originals: reached through the cached tensors, never read by f directly
        if parametrize.is_parametrized(sub):
            tensors += [getattr(sub, name) for name in sub.parametrizations]
        tensors += list(sub.parameters(recurse=False))
    return tensors


def embedding_row_dropout(weight_VE: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole word vectors (Gal & Ghahramani 2016 embedding dropout, as in AWD-LSTM / TrellisNet)."""
    if not training or p == 0.0:
        return weight_VE
    keep = 1.0 - p
    mask_V1 = torch.empty_like(weight_VE[:, :1]).bernoulli_(keep) / keep
    return weight_VE * mask_V1
