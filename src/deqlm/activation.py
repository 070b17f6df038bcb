"""Count the bytes autograd keeps for backward: the device-independent memory figure of a training step.

A DEQ stores one application of f however many solver steps it takes (Bai et al. 2019, Sec. 3.1.3); an
unrolled L-layer network stores L. `torch.autograd.graph.saved_tensors_hooks` sees every tensor an autograd
node saves while the context is open (including `ctx.save_for_backward` of custom Functions), so the sum
over the distinct storages is what the graph pins in memory until backward, whatever the device.

    with SavedTensorMeter(exclude=model.parameters()) as meter:
        loss = model(x, y, mems).loss
    meter.bytes   # distinct storages saved, parameters excluded

Storages are counted once however many views of them are saved; parameters (and anything else passed
in `exclude`) are not activations and are left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None
    if storage.nbytes() == 0:
        return None
    return (str(t.device), storage.data_ptr())


class SavedTensorMeter:
    """Context manager summing the distinct storages saved for backward (bytes, plus tensor count)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), enabled: bool = True):
        self.enabled = enabled
        self._exclude = {k for k in (_storage_key(p) for p in exclude) if k is not None}
        self._seen: set[tuple[str, int]] = set()
        self.bytes = 0
        self.n_saved = 0
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.n_saved += 1
        key = _storage_key(t)
        if key is not None and key not in self._exclude and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorMeter:
        if self.enabled:
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None
        self._seen.clear()


def saved_bytes(fn, *args, exclude: Iterable[torch.Tensor] = (), **kwargs) -> tuple[object, int]:
    """Run `fn(*args, **kwargs)` under a SavedTensorMeter; return (its result, bytes saved for backward)."""
    with SavedTensorMeter(exclude=exclude) as meter:
        result = fn(*args, **kwargs)
    return result, meter.bytes
