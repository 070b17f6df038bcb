"""Shared machinery of `deqlm.bench memory` and `deqlm.bench speed` (the rows they measure: protocol.py).

- Building a row's core from its experiment YAML, at full, reduced or quick (CI) size, and one training step
  of that core on random *embedded* inputs (the paper's memory column excludes word embeddings, so the
  embedding and softmax tables, their gradients and optimizer state are never built into the measurement).
- Peak memory of a window: CUDA allocator peak, or on CPU the peak of live CPU tensor bytes integrated from
  the allocation/free events of `torch.profiler.profile(profile_memory=True)`.
- A fresh-process runner: every measured configuration runs in its own `python -m deqlm.bench ...` child,
  with a timeout, and comes back as one JSON line.

Tensor names: B batch, L segment length, M memory length, E d_embed, D d_model, F flattened state per sample.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from deqlm.bench.protocol import (
    PAPER_BATCH,
    PAPER_MEM_LEN,
    PAPER_TGT_LEN,
    REPO_ROOT,
    PaperRow,
    find_experiment,
    get_row,
    protocol_overrides,
    size_overrides,
)
from deqlm.solvers.anderson import history_slots
from deqlm.solvers.broyden import buffer_slots

GIB = float(2**30)


# ---------------------------------------------------------------------------------------------------------
# Peak memory of a window.


class PeakMemory:
    """Peak bytes of live tensors on one device during `window()`, everything already resident included.

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (the allocator's own peak).
    CPU: PyTorch keeps no CPU allocator peak, so a `torch.profiler.profile(profile_memory=True)` session is
    opened *before* the model is built (`start()`); it records every CPU allocation and free with its size,
    and the running sum of those events is the live CPU tensor bytes at each instant. Its maximum inside the
    window is the peak. Allocations made before `start()` (import-time buffers) are not seen; library
    scratch memory that bypasses the PyTorch allocator (e.g. oneDNN workspaces) is not either.
    The process's RSS high-water mark minus its RSS at `start()` is kept as a second, coarser CPU figure.
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
        self.rss_start = _rss_bytes()
        if self.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile

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
        out = {"method": self.method, "rss_peak_delta_bytes": max(0, _rss_max_bytes() - self.rss_start)}
        if self.device.type == "cuda":
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            return out
        assert self._prof is not None, "start() was not called"
        self._prof.__exit__(None, None, None)
        out["peak_bytes"] = profiler_window_peak(self._prof, self._t0_ns, self._t1_ns)
        self._prof = None
        return out


WINDOW_MARK = "deqlm.bench/window"


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
    from torch.profiler import ProfilerActivity, profile

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


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def _rss_max_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def limit_cpu_memory(margin: float = 0.9) -> int | None:
    """Cap this process's address space near the RAM that is free now, so a row too big for the machine
    fails with a catchable allocation error instead of waking the kernel's OOM killer. Returns the cap."""
    try:
        import psutil
    except ImportError:
        return None
    free = psutil.virtual_memory().available
    cap = int(psutil.Process().memory_info().vms + margin * free)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


# ---------------------------------------------------------------------------------------------------------
# Fresh processes.


def run_fresh(subcommand: str, args: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run `python -m deqlm.bench SUBCOMMAND ARGS --json` in a fresh process; its last JSON line, or
    {'status': 'skipped', 'reason': ...} on timeout, crash or missing output (never raises)."""
    cmd = [sys.executable, "-m", "deqlm.bench", subcommand, *args, "--json"]
    child_env = dict(os.environ if env is None else env)
    src = str(REPO_ROOT / "src")
    old = child_env.get("PYTHONPATH")
    child_env["PYTHONPATH"] = src + (os.pathsep + old if old else "")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"timed out after {timeout_s:.0f} s (fresh process killed)"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rec.setdefault("wall_s", round(wall, 2))
            return rec
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "skipped", "reason": f"child exited {proc.returncode}: {tail}"}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def pick_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not one of cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------
# A row's core on embedded inputs.


@dataclass
class BuiltRow:
    row: PaperRow
    cfg: object  # ExperimentConfig
    experiment: str  # YAML path, relative to the repository
    overrides: list[str]  # everything applied on top of the YAML, in order
    model: torch.nn.Module  # SequenceLM built with a 2-word vocabulary; only its cells and core are used
    params: list[torch.nn.Parameter]  # the core's trainable parameters (the cells'; the DEQ engine has none)


def build_row(key: str, size: str, *, batch: int = PAPER_BATCH, tgt_len: int = PAPER_TGT_LEN,
              mem_len: int = PAPER_MEM_LEN, extra: list[str] | tuple[str, ...] = (),
              device: torch.device | None = None) -> BuiltRow:
    """Load the row's experiment YAML, apply the protocol, the size and `extra`, and build it on `device`.

    Word embeddings are excluded by construction: the model is built with a 2-word vocabulary and no
    adaptive clusters, so embedding and softmax tables hold a few hundred bytes, and the benchmark feeds the
    core random embedded inputs (see `CoreStep`) and optimises only the core's parameters.
    """
    from deqlm.config import load_config
    from deqlm.models import build_model

    row = get_row(key)
    path, row_overrides = find_experiment(row)
    overrides = protocol_overrides(batch, tgt_len, mem_len) + list(row_overrides)
    cfg = load_config(path, overrides)
    overrides += size_overrides(cfg, size) + list(extra)
    cfg = load_config(path, overrides + ["model.adaptive=false", "model.n_classes=0"])
    model = build_model(cfg.model, cfg.deq, vocab_size=2).to(device or torch.device("cpu"))
    model.train()
    params = [p for cell in model.layers for p in cell.parameters() if p.requires_grad]
    try:
        rel = str(path.relative_to(REPO_ROOT))
    except ValueError:
        rel = str(path)
    return BuiltRow(row, cfg, rel, overrides, model, params)


def core_input_width(cfg) -> int:
    """Width of the embedded input the core reads: d_model (Transformer, after the adaptive projection)
    or d_embed (TrellisNet)."""
    return cfg.model.d_model if cfg.model.arch == "transformer" else cfg.model.d_embed


def state_numel_per_sample(cfg, tgt_len: int) -> int:
    """F: the flattened equilibrium state of one sample (Transformer: L*D; TrellisNet: [h; c], each of
    nhid + nout channels: 2*(nhid + nout)*L)."""
    m = cfg.model
    return tgt_len * (m.d_model if m.arch == "transformer" else 2 * (m.d_model + m.d_out))


def solver_workspace_bytes(cfg, batch: int, tgt_len: int, elem_bytes: int = 4) -> int:
    """Bytes a DEQ solver holds besides f's activations, the larger of forward and backward (never both live).

    Broyden (deqlm.solvers.broyden) stores one step vector per iteration in a circular buffer of rank + 1
    slots, allocated in chunks of up to 8 as steps are taken: min(r + 1, max_iter) * F * B floats (r =
    deq.broyden_rank, so the buffer stops growing with the step cap; the official code keeps two vectors per
    allowed step, 2 * max_iter * F * B). Anderson keeps 2 * min(m, max_iter) histories (images and residuals);
    fixed-point iteration keeps none. Explicit cores: 0. An upper bound: the buffer grows only with the steps
    actually taken.
    """
    if cfg.model.core != "deq":
        return 0
    fb = state_numel_per_sample(cfg, tgt_len) * batch * elem_bytes
    d = cfg.deq

    def one(solver: str, max_iter: int) -> int:
        if solver == "broyden":
            return buffer_slots(d.broyden_rank, max_iter) * fb
        if solver == "anderson":
            return 2 * history_slots(d.anderson_m, max_iter) * fb
        return 0

    return max(one(d.f_solver, d.f_max_iter), one(d.b_solver, d.b_max_iter))


class CoreStep:
    """One training step of a row's core: embedded inputs u (B, L, E) -> core -> readout -> loss.

    The loss is the mean square of the readout (plus the row's auxiliary-loss readouts, weighted as in
    training): a stand-in for the softmax that keeps every tensor of the core in the graph while the softmax
    tables and logits stay out, as the paper's memory column asks. Memory carries over between calls exactly
    as in training (Transformer-XL memory of mem_len, TrellisNet history padding).
    """

    def __init__(self, built: BuiltRow, batch: int, tgt_len: int, mem_len: int, device: torch.device,
                 seed: int = 0):
        from deqlm.train.optim import build_optimizer

        self.built, self.device = built, device
        self.model = built.model
        self.mem_len = mem_len
        gen = torch.Generator(device="cpu").manual_seed(seed)
        width = core_input_width(built.cfg)
        self.u_BLE = torch.randn(batch, tgt_len, width, generator=gen).to(device)
        self.mems = self.model.init_mems(batch)
        self.optimizer = build_optimizer(built.params, built.cfg.optim)
        self.clip = built.cfg.optim.clip
        self.stats: dict = {}

    def forward(self, train: bool = True):
        """The core's forward on u with the current memory; returns (loss, CoreOut)."""
        model = self.model
        with model.weight_cache(model.core):
            out = model.core(model.layers, self.u_BLE, self.mems, mem_len=self.mem_len,
                             clamp_len=model.clamp_len)
            read = model.layers[-1].readout
            loss = read(out.z).float().pow(2).mean()
            aux_w = self.built.cfg.model.aux_weight
            if train and out.aux and aux_w > 0:
                loss = loss + aux_w * sum(read(z).float().pow(2).mean() for z in out.aux)
        return loss, out

    def step(self, meter=None) -> torch.Tensor:
        """zero_grad -> forward -> backward -> clip -> optimizer step; `meter` (a context manager) wraps the
        forward only (e.g. activation.SavedTensorMeter)."""
        import contextlib

        self.optimizer.zero_grad(set_to_none=True)
        with meter if meter is not None else contextlib.nullcontext():
            loss, out = self.forward()
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.built.params, self.clip)
        self.optimizer.step()
        self.mems = out.mems
        self.stats = dict(out.stats)
        return loss.detach()

    def materialise_optimizer_state(self) -> None:
        """A cheap warm-up: create the optimizer's state (Adam moments) with zero gradients and lr 0."""
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for p in self.built.params:
            p.grad = torch.zeros_like(p)
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def tensor_bytes(self) -> dict:
        """Parameter, gradient (one per parameter during the step) and optimizer-state bytes of the core."""
        param = sum(p.numel() * p.element_size() for p in self.built.params)
        optim = 0
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    optim += v.numel() * v.element_size()
        return {"param_bytes": param, "grad_bytes": param, "optim_bytes": optim,
                "params_core": sum(p.numel() for p in self.built.params)}


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def fmt(x, digits: int = 2) -> str:
    """A table cell: numbers rounded, missing values as an en dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def load_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def plt_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, list(axes[0])
