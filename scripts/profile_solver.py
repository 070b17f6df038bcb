"""Where the time of one DEQ forward solve goes, per operator: f against the solver's own work.

    python scripts/profile_solver.py [--row wt103-deq-trellisnet] [--device cuda] [--size full|reduced]

Builds a paper row's core as `python -m deqlm.bench speed` does (batch 15, sequence 150, random embedded
inputs), runs the forward solve once untimed, then once timed and once under torch.profiler, and prints
the solver steps taken, wall-clock per step beyond f (the solver's own share) and the operator table (sorted
by device time on CUDA, by CPU time otherwise). A diagnostic for tuning, not a benchmark: one solve.
"""

from __future__ import annotations

import argparse
import time

from deqlm.bench import protocol as P


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", default="wt103-deq-trellisnet")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=("full", "reduced"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # torch and the model code load only now, once the arguments are understood: `--help` answers at once
    import torch

    from deqlm.bench.core_step import CoreStep
    from deqlm.bench.rows import build_row
    from deqlm.infra.runtime import describe_device, pick_device

    device = pick_device(args.device)
    built = build_row(args.row, args.size, device=device)
    step = CoreStep(built, P.PAPER_BATCH, P.PAPER_TGT_LEN, P.PAPER_MEM_LEN, device)
    model = step.model
    deq = model.core.deq
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def solve():
        with torch.no_grad():
            loss, out = step.forward(train=False)
        sync()
        return out

    solve()
    calls = {"n": 0, "s": 0.0}
    cell = model.cell_list[0]
    inner = cell.forward

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        r = inner(*a, **k)
        sync()
        calls["n"] += 1
        calls["s"] += time.perf_counter() - t0
        return r

    cell.forward = timed
    t0 = time.perf_counter()
    out = solve()
    total = time.perf_counter() - t0
    cell.forward = inner
    n = max(calls["n"], 1)
    print(f"row {args.row} size {args.size} device {describe_device(device)} f_max_iter {deq.f_max_iter} "
          f"solver {deq.f_solver} stats {out.stats}")
    print(f"solve {1e3 * total:.1f} ms, f calls {calls['n']}, f {1e3 * calls['s'] / n:.2f} ms each, "
          f"beyond f {1e3 * (total - calls['s']) / max(n - 1, 1):.2f} ms per step")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        solve()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40))


if __name__ == "__main__":
    main()
