"""How far a batch's hardest sample lags its median one, per solver, over several draws of the solver
benchmark's workload.

    python scripts/solver_spread_seeds.py [--seeds 8] [--solvers anderson anderson:m=8,lam=1e-3 ...] [--out F]

Problem 0 is `python -m deqlm.bench solver`'s own workload (its `_build`); problems 1..N draw the block's
weights and the input after `torch.manual_seed(s - 1)` (same sizes). Each solver runs with its defaults
at the benchmark's limits (rel residual, tol 1e-3, 30 steps, z0 = 0); per problem the per-sample relative
residuals at the returned z give `max / median`. A solver is a name, optionally with keyword settings after a
colon (`anderson:m=8,lam=1e-3`). The question it answers: is the benchmark's Anderson target
(max within 3x of the median) a property of the solver, or of which 8 samples a workload happens to draw?
(docs/solvers.md) Deterministic: no timing, so it may run beside other work.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from deqlm.choices import SolverName, values
from deqlm.infra.io import atomic_write_json

if TYPE_CHECKING:
    import torch

    from deqlm.bench.solver import Block, Workload


def problems(n_seeds: int, w: Workload) -> list[tuple[Block, torch.Tensor]]:
    """(block, injection u) for the benchmark's workload and `n_seeds` redraws."""
    import torch  # loaded on use, as in main: `--help` answers without torch

    from deqlm.bench.solver import Block, _build

    out = []
    block, _, x_BLD, _ = _build(w)
    out.append((block, x_BLD))
    for seed in range(n_seeds):
        torch.manual_seed(seed)
        block = Block(w)
        out.append((block, torch.randn(w.batch, w.seq_len, w.d_model)))
    with torch.no_grad():
        return [(block, block.inject(x_BLD)) for block, x_BLD in out]


def parse_solver(spec: str) -> tuple[str, dict]:
    """'anderson:m=8,lam=1e-3' -> ('anderson', {'m': 8, 'lam': 0.001}); numbers as int when they are."""
    name, _, settings = spec.partition(":")
    kwargs = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"solver setting {item!r} in {spec!r} is not KEY=VALUE")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return name, kwargs


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8, help="redraws besides the benchmark's own workload")
    ap.add_argument("--solvers", nargs="+", default=list(values(SolverName)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # torch and the solver code load only now, once the arguments are understood: `--help` answers at once
    import torch

    from deqlm.bench.solver import Workload, _rel_res_B
    from deqlm.solvers import get_solver

    torch.set_num_threads(args.threads)
    w = Workload()
    probs = problems(args.seeds, w)
    lines = []
    for spec in args.solvers:
        name, kwargs = parse_solver(spec)
        solve = get_solver(name)
        ratios, medians, maxima = [], [], []
        with torch.no_grad():
            for block, u in probs:
                f = lambda z, block=block, u=u: block(z, u)  # noqa: E731
                res = solve(f, torch.zeros(w.batch, w.seq_len, w.d_model), max_iter=w.f_max_iter, tol=w.tol,
                            stop_mode="rel", **kwargs)
                rel_B = _rel_res_B(f, res.z)
                ratios.append(round(float(rel_B.max() / rel_B.median()), 3))
                medians.append(float(rel_B.median()))
                maxima.append(float(rel_B.max()))
        line = {"solver": spec, "max_over_median": ratios,
                "problems_within_3x": sum(r <= 3.0 for r in ratios), "problems": len(ratios),
                "median_rel_res": [round(m, 5) for m in medians],
                "max_rel_res": [round(m, 5) for m in maxima],
                "median_of_medians": round(statistics.median(medians), 5)}
        lines.append(line)
        print(line, flush=True)
    if args.out:
        atomic_write_json(args.out, {"workload": asdict(w),
                                     "seeds": args.seeds, "threads": args.threads, "lines": lines})


if __name__ == "__main__":
    main()
