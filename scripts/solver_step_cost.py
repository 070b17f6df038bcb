"""Where a Broyden or Anderson step's time goes on the solver benchmark's workload, in ms per solver step.

    python scripts/solver_step_cost.py [--solver broyden|anderson] [--rank 30] [--threads 2] [--repeats 4]

Times f, the stopping test (`observe`, `any_active`) and what remains of the loop, and per solver: Broyden's
two history products (`dots`, `combine`) and the rest of its step function (rank x rank algebra, the new step
and its Gram entries); Anderson's mixing weights (the small Gram system). "Rest of the loop" is then the
update and the residual, and for Anderson also its history products (the Gram row and the mixing) and the copy
of f(z) into the history. Wall-clock timers wrap those functions during `--repeats` forward solves after two
untimed solves. A diagnostic, not a benchmark: the wrappers add a few microseconds per call.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", choices=["broyden", "anderson"], default="broyden")
    ap.add_argument("--rank", type=int, default=30, help="Broyden's rank")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    return ap.parse_args()


def timed(spent: dict[str, float], owner, name: str, label: str) -> None:
    """Replace owner.name by a wrapper that adds its wall-clock time to spent[label]."""
    inner = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        spent[label] += time.perf_counter() - t0
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    args = parse_args()
    # torch and the solver code load only now, once the arguments are understood: `--help` answers at once
    import torch

    from deqlm.bench.solver import Workload, _build

    torch.set_num_threads(args.threads)
    mod = importlib.import_module(f"deqlm.solvers.{args.solver}")
    spent: dict[str, float] = collections.defaultdict(float)
    if args.solver == "broyden":
        timed(spent, mod._StepBuffer, "dots", "history products")
        timed(spent, mod._StepBuffer, "combine", "history products")
        timed(spent, mod, "_next_step", "step function")
    else:
        timed(spent, mod, "mixing_weights", "mixing weights")
    timed(spent, mod.Tracker, "observe", "stopping test")
    timed(spent, mod.Tracker, "any_active", "stopping test")
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
    kw = dict(max_iter=w.f_max_iter, tol=w.tol, stop_mode="rel")
    if args.solver == "broyden":
        kw["rank"] = args.rank
    solve = getattr(mod, args.solver)
    for _ in range(2):
        solve(f, z0, **kw)
    spent.clear()
    steps = 0
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        steps += solve(f, z0, **kw).nstep
    total = time.perf_counter() - t0
    per = {k: 1e3 * v / steps for k, v in spent.items()}
    if args.solver == "broyden":
        per["step function"] -= per["history products"]  # nested: keep the rest of the step function only
    per["rest of the loop"] = 1e3 * total / steps - sum(per.values())
    what = f"broyden rank {args.rank}" if args.solver == "broyden" else "anderson"
    print(f"{what}, {args.threads} threads, {steps} steps; ms per step:")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18s} {v:7.3f}")
    print(f"  overhead / f       {(1e3 * total / steps - per['f']) / per['f']:7.3f}")


if __name__ == "__main__":
    main()
