"""Where a Broyden step's time goes on the solver benchmark's workload, in ms per solver step.

    python scripts/solver_step_cost.py [--rank 30] [--threads 2] [--repeats 4]

Times f, the two history products (`dots`, `combine`), the rest of the step function (rank x rank algebra,
the new step and its Gram entries), the stopping test (`observe`, `any_active`) and what remains of the loop
(the update z += s, the residual g = f(z) - z, the wrappers), by wrapping those functions with wall-clock
timers during `--repeats` forward solves after two warm-up solves. A diagnostic, not a benchmark: the
wrappers add a few microseconds per call.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time

import torch

from deqlm.bench.solver import Workload, _build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = importlib.import_module("deqlm.solvers.broyden")
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = inner(*a, **k)
            spent[label] += time.perf_counter() - t0
            return out

        setattr(owner, name, wrapper)

    timed(mod._StepBuffer, "dots", "history products")
    timed(mod._StepBuffer, "combine", "history products")
    timed(mod, "_next_step", "step function")
    timed(mod.Tracker, "observe", "stopping test")
    timed(mod.Tracker, "any_active", "stopping test")
    w = Workload()
    block, _, x_BLD, _ = _build(w)
    with torch.no_grad():
        u = block.inject(x_BLD)

    def f(z):
        t0 = time.perf_counter()
        out = block(z, u)
        spent["f"] += time.perf_counter() - t0
        return out

    z0 = torch.zeros_like(x_BLD)
    kw = dict(max_iter=w.f_max_iter, tol=w.tol, stop_mode="rel", rank=args.rank)
    for _ in range(2):
        mod.broyden(f, z0, **kw)
    spent.clear()
    steps = 0
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        steps += mod.broyden(f, z0, **kw).nstep
    total = time.perf_counter() - t0
    per = {k: 1e3 * v / steps for k, v in spent.items()}
    per["step function"] -= per["history products"]  # nested: keep the rest of the step function only
    per["rest of the loop"] = 1e3 * total / steps - sum(per.values())
    print(f"rank {args.rank}, {args.threads} threads, {steps} steps; ms per step:")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18s} {v:7.3f}")
    print(f"  overhead / f       {(1e3 * total / steps - per['f']) / per['f']:7.3f}")


if __name__ == "__main__":
    main()
