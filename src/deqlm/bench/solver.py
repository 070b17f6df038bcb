"""`python -m deqlm.bench solver`: our solvers, TorchDEQ's (if installed), unrolled stacks, one workload.

The workload (fixed; `--quick` shrinks every size for CI): f(z; x) is one weight-tied post-LN causal
Transformer block in DEQ-Transformer style,

    u = W_inj x + b                                   (once per forward, outside f)
    q, k, v = split(W_qkv z + u);  a = causal-attention(q, k, v)
    z1 = LN(z + W_o a + b_o);      f = LN(z1 + W_2 relu(W_1 z1 + b_1) + b_2)

d_model 256, 4 heads, FFN 1024, sequence 128, batch 8, float32, 2 threads, PyTorch default init after
manual_seed(0), x ~ N(0, 1), a Linear(256, 2000) readout with cross-entropy on random targets, Adam, z0 = 0.
Solve: rel residual per sample, tol 1e-3, <= 30 forward steps; backward: same solver, tol 1e-3, <= 40 steps.

One JSON line per configuration with: f_evals (forward f-evaluations made), rel_res_max / rel_res_median (per
sample ||f(z)-z|| / ||f(z)|| at the returned z, recomputed here identically for every line), forward_ms and
train_step_ms (medians after one untimed; a step is forward + backward + Adam step), solver_overhead (time per
solver step outside f, as a fraction of one f-evaluation, measured inside the same timed solves),
peak_step_mb (peak live CPU tensor bytes above the step's start, integrated from torch.profiler's memory
events), saved_bytes (bytes packed for backward, via saved_tensors_hooks, unique storages, parameters
excluded). Broyden and Anderson lines add history_mb_per_step (stored history a forward step reads or writes,
from the buffer rule in `history_bytes_per_step`) and history_floor: that traffic at the host's measured
read bandwidth (`read_gbps`), as a fraction of one f-evaluation, i.e. the part of solver_overhead no
implementation that keeps the history in float32 can avoid.
"""

# B: batch, L: sequence length, D: d_model, H: heads, K: d_head, V: readout classes

from __future__ import annotations

import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deqlm.bench import cli
from deqlm.deq import DEQFixedPoint
from deqlm.infra.allocator import tune_allocator
from deqlm.infra.io import atomic_write_json
from deqlm.infra.memory import peak_live_bytes
from deqlm.solvers import get_solver
from deqlm.solvers.anderson import history_slots
from deqlm.solvers.broyden import buffer_slots


@dataclass
class Workload:
    d_model: int = 256
    n_head: int = 4
    d_inner: int = 1024
    seq_len: int = 128
    batch: int = 8
    n_classes: int = 2000
    f_max_iter: int = 30
    b_max_iter: int = 40
    tol: float = 1e-3
    untimed: int = 1
    repeats: int = 3
    depths: tuple[int, ...] = (16, 30)


QUICK = Workload(
    d_model=32,
    n_head=2,
    d_inner=64,
    seq_len=16,
    batch=2,
    n_classes=50,
    f_max_iter=10,
    b_max_iter=10,
    untimed=0,
    repeats=1,
    depths=(4,),
)


class Block(nn.Module):
    """One post-LN causal Transformer block with the input injected into q, k, v."""

    def __init__(self, w: Workload):
        super().__init__()
        self.n_head = w.n_head
        self.inj = nn.Linear(w.d_model, 3 * w.d_model)
        self.qkv = nn.Linear(w.d_model, 3 * w.d_model, bias=False)
        self.out = nn.Linear(w.d_model, w.d_model)
        self.ln1, self.ln2 = nn.LayerNorm(w.d_model), nn.LayerNorm(w.d_model)
        self.ff1, self.ff2 = nn.Linear(w.d_model, w.d_inner), nn.Linear(w.d_inner, w.d_model)

    def inject(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.inj(x_BLD)

    def forward(self, z_BLD: torch.Tensor, u_BL3D: torch.Tensor) -> torch.Tensor:
        B, L, D = z_BLD.shape
        qkv_3BHLK = (
            (self.qkv(z_BLD) + u_BL3D).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        )
        a_BLD = F.scaled_dot_product_attention(*qkv_3BHLK, is_causal=True).transpose(1, 2).reshape(B, L, D)
        z1_BLD = self.ln1(z_BLD + self.out(a_BLD))
        return self.ln2(z1_BLD + self.ff2(torch.relu(self.ff1(z1_BLD))))


class Timed:
    """f with the wall time spent inside it and the number of calls."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]):
        self.f, self.seconds, self.calls = f, 0.0, 0

    def __call__(self, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.f(z)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _build(w: Workload):
    torch.manual_seed(0)
    block = Block(w)
    readout = nn.Linear(w.d_model, w.n_classes)
    x_BLD = torch.randn(w.batch, w.seq_len, w.d_model)
    y_BL = torch.randint(0, w.n_classes, (w.batch, w.seq_len))
    return block, readout, x_BLD, y_BL


def _rel_res_B(f: Callable, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fz = f(z)
        return (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1).clamp_min(1e-30)


def saved_activation_bytes(fn: Callable[[], object], params: list[torch.Tensor]) -> int:
    """Bytes packed for backward during fn(): unique storages, parameters excluded."""
    param_ptrs = {p.data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _median_ms(fn: Callable[[], object], w: Workload) -> float:
    for _ in range(w.untimed):
        fn()
    times = []
    for _ in range(w.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _measure(
    name: str, w: Workload, solve: Callable | None, make_core: Callable, depth: int | None = None
) -> dict:
    """One line. `solve(f, z0) -> z`: the no-grad forward; `make_core()` -> `core(f, z0) -> (z, stats)`."""
    block, readout, x_BLD, y_BL = _build(w)
    params = list(block.parameters()) + list(readout.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    z0 = torch.zeros_like(x_BLD)
    core = make_core()
    stats: dict = {}
    fwd = _time_forward(w, block, x_BLD, solve, overhead=depth is None)

    def forward_with_graph():
        u_BL3D = block.inject(x_BLD)
        return core(lambda z: block(z, u_BL3D), z0)

    def step():
        opt.zero_grad(set_to_none=True)
        z_BLD, st = forward_with_graph()
        loss = F.cross_entropy(readout(z_BLD).flatten(0, 1), y_BL.flatten())
        loss.backward()
        opt.step()
        stats.update(st)

    train_ms = _median_ms(step, w)
    peak = peak_live_bytes(step)
    saved = saved_activation_bytes(forward_with_graph, params)
    line = {
        "solver": name,
        "f_evals": fwd["f_evals"],
        "rel_res_max": float(fwd["rel_B"].max()),
        "rel_res_median": float(fwd["rel_B"].median()),
        "forward_ms": round(fwd["ms"], 1),
        "train_step_ms": round(train_ms, 1),
        "solver_overhead": None if fwd["overhead"] is None else round(fwd["overhead"], 4),
        "peak_step_mb": round(peak / 2**20, 1),
        "saved_bytes": saved,
        "f_ms": round(1e3 * fwd["f_s"] / max(fwd["f_evals"], 1), 2),
    }
    if "b_nstep" in stats:
        line["b_nstep"] = stats["b_nstep"]
    return line


def _time_forward(w: Workload, block: Block, x_BLD: torch.Tensor, solve: Callable, overhead: bool) -> dict:
    """The no-grad forward solve timed, with the time spent inside f recorded: its median ms, the last run's
    f-evaluations, time in f and per-sample residuals, and (`overhead`) the solver's time per step outside f
    as a fraction of one f-evaluation."""
    with torch.no_grad():
        u_BL3D = block.inject(x_BLD)
    z0 = torch.zeros_like(x_BLD)
    runs = []

    def forward():
        timed = Timed(lambda z: block(z, u_BL3D))
        t0 = time.perf_counter()
        with torch.no_grad():
            z = solve(timed, z0)
        runs.append((time.perf_counter() - t0, timed.seconds, timed.calls))
        return z

    ms = _median_ms(forward, w)
    z = forward()
    rel_B = _rel_res_B(lambda z: block(z, u_BL3D), z)
    _, f_s, f_evals = runs[-1]
    frac = None
    if overhead and f_evals > 1:
        frac = statistics.median((t - fs) / (n - 1) / (fs / n) for t, fs, n in runs[w.untimed :] or runs)
    return {"ms": ms, "f_evals": f_evals, "f_s": f_s, "rel_B": rel_B, "overhead": frac}


def _our_core(name: str, w: Workload, solver_kw: dict) -> DEQFixedPoint:
    """Our implicit layer with `name` for both solves, at the workload's limits and tolerance."""
    return DEQFixedPoint(
        f_solver=name,
        b_solver=name,
        f_max_iter=w.f_max_iter,
        b_max_iter=w.b_max_iter,
        f_tol=w.tol,
        b_tol=w.tol,
        stop_mode="rel",
        solver_kwargs={name: solver_kw},
    )


def _ours(name: str, w: Workload, **solver_kw) -> dict:
    """Our solver with its defaults, or with `solver_kw` (e.g. rank=30), which then also names the line."""
    solver = get_solver(name)

    def solve(f, z0):
        return solver(f, z0, max_iter=w.f_max_iter, tol=w.tol, stop_mode="rel", **solver_kw).z

    def make_core():
        return _our_core(name, w, solver_kw)

    suffix = "".join(f".{k}{v}" for k, v in solver_kw.items())
    line = _measure(f"deqlm.{name}{suffix}", w, solve, make_core)
    # the solver's own settings in effect (defaults included), so a saved line says what it measured
    defaults = {
        k: p.default
        for k, p in inspect.signature(solver).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("max_iter", "tol", "stop_mode", "explode")
    }
    line["settings"] = settings = {**defaults, **solver_kw}
    hist = history_bytes_per_step(
        name, settings, line["f_evals"] - 1, w.f_max_iter, w.batch, w.seq_len * w.d_model
    )
    if hist is not None:
        # what reading the stored history alone costs at the host's memory bandwidth, in f-evaluations
        line["history_mb_per_step"] = round(hist / 2**20, 2)
        line["history_floor"] = round(hist / (read_gbps() * 1e9) / (line["f_ms"] / 1e3), 4)
    return line


def history_bytes_per_step(
    name: str, settings: dict, nstep: int, max_iter: int, B: int, F: int
) -> float | None:
    """Bytes of stored history a forward step reads or writes, averaged over `nstep` steps (float32).

    Broyden step k (k >= 1) reads its N = min(k, K) stored steps twice less one (the products S g and the
    combination over s_{lo+1}..s_k) and writes one; Anderson step n reads its N = min(n + 1, M) residuals
    and N images (and the residuals again when beta != 1) and writes two slots. None for plain iteration."""
    if nstep < 1 or name not in ("broyden", "anderson"):
        return None
    slot = B * F * 4
    total = 0
    for k in range(nstep):
        if name == "broyden":
            N = min(k, buffer_slots(settings["rank"], max_iter))
            total += 2 * N * slot if k else slot
        else:
            N = min(k + 1, history_slots(settings["m"], max_iter))
            total += (N * (3 if settings["beta"] != 1.0 else 2) + 2) * slot
    return total / nstep


_READ_GBPS: list[float] = []


def read_gbps() -> float:
    """The host's memory read bandwidth as the solvers see it: a batched product reading 64 MB (larger
    than common last-level caches), median of 5 (measured once per process)."""
    if not _READ_GBPS:
        S_BNF = torch.randn(8, 64, 32768)
        v_BF = torch.randn(8, 32768)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            torch.bmm(v_BF[:, None], S_BNF.mT)
            times.append(time.perf_counter() - t0)
        _READ_GBPS.append(S_BNF.numel() * 4 / statistics.median(times[1:]) / 1e9)
    return _READ_GBPS[0]


def _torchdeq(name: str, w: Workload) -> dict:
    from torchdeq import get_deq
    from torchdeq.solver import get_solver as td_solver

    solver = td_solver(name)

    def solve(f, z0):
        return solver(f, z0, max_iter=w.f_max_iter, tol=w.tol, stop_mode="rel")[0]

    def make_core():
        deq = get_deq(
            core="indexing",
            ift=True,
            f_solver=name,
            b_solver=name,
            f_max_iter=w.f_max_iter,
            b_max_iter=w.b_max_iter,
            f_tol=w.tol,
            b_tol=w.tol,
            f_stop_mode="rel",
            b_stop_mode="rel",
        )

        def core(f, z0):
            z_list, info = deq(f, z0)
            return z_list[-1], {}

        return core

    return _measure(f"torchdeq.{name}", w, solve, make_core)


def _unrolled(depth: int, w: Workload) -> dict:
    def solve(f, z0):
        z = z0
        for _ in range(depth):
            z = f(z)
        return z

    def make_core():
        return lambda f, z0: (solve(f, z0), {})

    return _measure(f"unrolled.{depth}", w, solve, make_core, depth=depth)


def rank_sweep(w: Workload, ranks: list[int], train_steps: int = 4) -> list[dict]:
    """Broyden by rank: the forward residual after the step cap, then `train_steps` training steps with the
    same rank in both solves, recording each adjoint (backward) solve's step count and final residual."""
    return [_rank_line(w, rank, train_steps) for rank in ranks]


def _rank_line(w: Workload, rank: int, train_steps: int) -> dict:
    block, readout, x_BLD, y_BL = _build(w)
    with torch.no_grad():
        u = block.inject(x_BLD)

    def f(z):
        return block(z, u)

    res = get_solver("broyden")(f, torch.zeros_like(x_BLD), max_iter=w.f_max_iter, tol=w.tol, rank=rank)
    rel_B = _rel_res_B(f, res.z)
    core = _our_core("broyden", w, {"rank": rank})
    opt = torch.optim.Adam(list(block.parameters()) + list(readout.parameters()), lr=1e-3)
    b_nstep, b_rel_res = [], []
    for _ in range(train_steps):
        opt.zero_grad(set_to_none=True)
        u_BL3D = block.inject(x_BLD)
        z_BLD, stats = core(lambda z: block(z, u_BL3D), torch.zeros_like(x_BLD))  # noqa: B023
        F.cross_entropy(readout(z_BLD).flatten(0, 1), y_BL.flatten()).backward()
        opt.step()
        b_nstep.append(stats.get("b_nstep"))
        b_rel_res.append(stats.get("b_rel_res"))
    return {
        "solver": "deqlm.broyden",
        "rank": rank,
        "f_evals": res.f_evals,
        "rel_res_max": float(rel_B.max()),
        "rel_res_median": float(rel_B.median()),
        "b_max_iter": w.b_max_iter,
        "b_nstep_per_train_step": b_nstep,
        "b_rel_res_per_train_step": b_rel_res,
    }


def run(w: Workload, with_torchdeq: bool = True, report: Callable[[dict], None] | None = None) -> list[dict]:
    """Every line of the benchmark, in order; `report(line)` is called as each one is measured."""
    jobs: list[Callable[[], dict]] = [
        lambda n=name: _ours(n, w) for name in ("broyden", "anderson", "fixed_point")
    ]
    jobs.append(lambda: _ours("broyden", w, rank=10))  # a third of the buffer: the trade-off, docs/solvers.md
    if with_torchdeq:
        try:
            import torchdeq  # noqa: F401
        except ImportError:
            with_torchdeq = False
    if with_torchdeq:
        jobs += [lambda n=name: _torchdeq(n, w) for name in ("broyden", "anderson", "fixed_point_iter")]
    jobs += [lambda d=depth: _unrolled(d, w) for depth in w.depths]
    lines = []
    for job in jobs:
        lines.append(job())
        if report is not None:
            report(lines[-1])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = cli.solver_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.quick else 2)  # quick: CI boxes are shared; one thread avoids spin-waits
    w = QUICK if args.quick else Workload()

    def report(line: dict) -> None:
        text = json.dumps(line) if args.json else "  ".join(f"{k}={v}" for k, v in line.items())
        print(text, flush=True)

    if args.rank_sweep:
        try:
            ranks = [int(r) for r in args.rank_sweep.split(",")]
        except ValueError:
            parser.error(f"--rank-sweep {args.rank_sweep!r}: expected comma-separated integers, e.g. 4,10,30")
        lines = rank_sweep(w, ranks)
        for line in lines:
            report(line)
    else:
        lines = run(w, with_torchdeq=not args.no_torchdeq, report=report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "workload": asdict(w),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lines": lines,
        }
        atomic_write_json(args.out, payload, indent=1)
    return 0


if __name__ == "__main__":
    tune_allocator()
    sys.exit(main())
