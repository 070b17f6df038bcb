"""Memory metering, all of it: what autograd keeps for backward, a logging window's peak, a benchmark's peak.

- `SavedTensorMeter` / `saved_bytes`: the bytes autograd keeps for backward, the device-independent memory
  figure of a training step. A DEQ stores one application of f however many solver steps it takes (Bai et
  al. 2019, Sec. 3.1.3); an unrolled L-layer network stores L. `torch.autograd.graph.saved_tensors_hooks`
  sees every tensor an autograd node saves while the context is open (custom Functions' `save_for_backward`
  included), so the sum over distinct storages is what the graph pins until backward. Views of one storage
  count once; parameters (and anything in `exclude`) are not activations and are left out.
- `MemoryMeter`: the trainer's per-window peak, the CUDA allocator's (reset after each read) or, on CPU, the
  process's RSS high-water mark, which cannot be reset and is reported as the maximum so far.
- `PeakMemory`: a benchmark window's peak. PyTorch keeps no CPU allocator peak, so on CPU a
  `torch.profiler.profile(profile_memory=True)` session records every allocation and free with its size; the
  running sum of those events is the live CPU tensor bytes at each instant, and its maximum inside the window
  is the peak. The RSS high-water mark is kept beside it as a coarser figure.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import psutil
import torch
from torch.profiler import ProfilerActivity, profile

GIB = float(2**30)
WINDOW_MARK = "deqlm.bench/window"


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


class MemoryMeter:
    """Peak memory of a logging window: CUDA allocator peak, or the process RSS high-water mark on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_alloc_peak" if device.type == "cuda" else "cpu_rss_max"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        """Peak since the last reset (CUDA) or since the process started (CPU)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return cpu_rss_max_bytes() / GIB


def cpu_rss_max_bytes() -> int:
    """Max resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class PeakMemory:
    """Peak bytes of live tensors on one device during `window()`, everything already resident included.

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (the allocator's own peak).
    CPU: the profiler session is opened *before* the model is built (`start()`), so everything the model and
    the priming step allocate counts as resident. Allocations made before `start()` (import-time buffers) are
    not seen; library scratch memory that bypasses the PyTorch allocator (e.g. oneDNN workspaces) is not
    either. The process's RSS high-water mark minus its RSS at `start()` is kept as a second, coarser figure.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ("cuda_max_memory_allocated" if device.type == "cuda"
                       else "cpu_profiler_live_tensor_bytes")
        self._prof = None
        self._marker = None
        self._t0_ns = self._t1_ns = 0
        self.rss_start = 0

    def start(self) -> None:
        self.rss_start = int(psutil.Process().memory_info().rss)
        if self.device.type == "cpu":
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def begin_window(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._prof is not None:
            self._marker = torch.profiler.record_function(WINDOW_MARK)
            self._marker.__enter__()
        self._t0_ns = time.time_ns()

    def end_window(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t1_ns = time.time_ns()
        if self._marker is not None:
            self._marker.__exit__(None, None, None)
            self._marker = None

    def close(self) -> None:
        """Stop the profiler without a result (error paths: exiting with a live profiler can crash)."""
        if self._marker is not None:
            self._marker.__exit__(None, None, None)
            self._marker = None
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def result(self) -> dict:
        """{'peak_bytes', 'method', 'rss_peak_delta_bytes'}; closes the profiler on CPU."""
        out = {"method": self.method, "rss_peak_delta_bytes": max(0, cpu_rss_max_bytes() - self.rss_start)}
        if self.device.type == "cuda":
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            return out
        assert self._prof is not None, "start() was not called"
        self._prof.__exit__(None, None, None)
        out["peak_bytes"] = profiler_window_peak(self._prof, self._t0_ns, self._t1_ns)
        self._prof = None
        return out


def memory_events(kineto_events) -> list[tuple[int, int]]:
    """(ns, bytes) of the profiler's CPU `[memory]` events (bytes > 0 alloc, < 0 free) in time order.

    Events with equal timestamps keep the order they were recorded in: sorting them by size as well would put
    frees before the allocation they follow (a concatenation, then its inputs freed) and understate a peak."""
    events = [(e.start_ns(), e.nbytes()) for e in kineto_events
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    return sorted(events, key=lambda tb: tb[0])


def running_live(events: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(ns, live bytes after the event) along `memory_events(...)`: the running sum peaks are read from."""
    live = 0
    for t, nbytes in events:
        live += nbytes
        yield t, live


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """Peak live CPU tensor bytes during fn() above those live at its start (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = memory_events(prof.profiler.kineto_results.events())
    return max([0, *(live for _, live in running_live(events))])


def profiler_window_peak(prof, t0_ns: int, t1_ns: int) -> int:
    """Max over the window of the running sum of CPU `[memory]` events (bytes > 0 alloc, < 0 free).

    The window is the `WINDOW_MARK` record_function span on the profiler's own clock; [t0, t1] (wall clock,
    ns) stands in only when that span is missing."""
    kineto = prof.profiler.kineto_results.events()
    marks = [e for e in kineto if e.name() == WINDOW_MARK]
    if marks:
        t0_ns, t1_ns = marks[-1].start_ns(), marks[-1].end_ns()
    before = 0  # live bytes before the current event
    peak = None
    for t, live in running_live(memory_events(kineto)):
        if t >= t0_ns and peak is None:
            peak = before
        if t0_ns <= t <= t1_ns:
            peak = live if peak is None else max(peak, live)
        before = live
    return int(peak if peak is not None else before)


def limit_cpu_memory(margin: float = 0.9) -> int:
    """Cap this process's address space near the RAM that is free now, so a row too big for the machine
    fails with a catchable allocation error instead of waking the kernel's OOM killer. Returns the cap."""
    free = psutil.virtual_memory().available
    cap = int(psutil.Process().memory_info().vms + margin * free)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap
