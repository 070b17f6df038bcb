"""Solver overhead of two commits side by side: the solver benchmark's lines, alternating fresh processes.

    python scripts/solver_overhead_ab.py OLD_REV NEW_REV [--rounds 3] [--solvers anderson fixed_point broyden]

Each commit is checked out in a temporary git worktree (removed afterwards); every round runs one fresh
process per commit, old then new, each measuring `deqlm.bench.solver._ours(name, Workload())` for every
solver, i.e. the same lines as `python -m deqlm.bench solver` (2 threads). Printed per round: each solver's
`solver_overhead`, `f_ms` and `rel_res_max`; then the median overhead per commit. Alternating is what makes
the comparison fair on a shared, noisy machine: a slow spell hits both commits. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-C", str(REPO), "worktree"]

CHILD = r"""
import json, sys, torch
torch.set_num_threads(2)
from deqlm.bench.solver import Workload, _ours
w = Workload()
lines = {n: _ours(n, w) for n in sys.argv[1:]}
keys = ("solver_overhead", "f_ms", "rel_res_max")
print(json.dumps({n: {k: line[k] for k in keys} for n, line in lines.items()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--solvers", nargs="+", default=["anderson", "fixed_point", "broyden"])
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {args.old: [], args.new: []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for rev in runs:
            trees[rev] = Path(tmp) / rev.replace("/", "_")
            subprocess.run([*GIT, "add", "-q", "--detach", str(trees[rev]), rev], check=True)
        try:
            for r in range(args.rounds):
                for rev, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
                    out = subprocess.run([sys.executable, "-c", CHILD, *args.solvers], env=env, check=True,
                                         capture_output=True, text=True).stdout
                    runs[rev].append(json.loads(out.strip().splitlines()[-1]))
                    print(f"round {r + 1} {rev}: {runs[rev][-1]}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run([*GIT, "remove", "--force", str(tree)], check=False)
    for name in args.solvers:
        medians = {rev: statistics.median(line[name]["solver_overhead"] for line in lines)
                   for rev, lines in runs.items()}
        print(f"{name}: median overhead " + ", ".join(f"{rev} {m:.3f}" for rev, m in medians.items()))


if __name__ == "__main__":
    main()
