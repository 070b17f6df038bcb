"""Where one training step of a paper row reaches its CPU memory peak, and what is running then.

    python scripts/memory_peak_timeline.py ROW [--batch 15] [--steps 12] [--points 24] [--set KEY=VALUE ...]

Builds ROW as `python -m deqlm.bench memory` does (embedded inputs, no word embeddings, light priming step),
runs one training step inside a `torch.profiler` memory session and prints: the peak of live tensor bytes and
the live bytes at the step's start (parameters, optimizer state, memory tensors), the operators running at the
instant of the peak (outermost first), and live MiB at evenly spaced points of the step. `--steps` caps
both solves of a DEQ row (tolerance 0, so every solve runs to it): 12 already fills a rank-10 Broyden buffer,
and the step is much shorter than at the rows' own caps. A diagnostic for memory work (docs/benchmarks.md),
not a benchmark: the benchmark's figure for a row is `python -m deqlm.bench memory --paper --rows ROW`.
"""

from __future__ import annotations

import argparse

from deqlm.bench import protocol as P


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("row", choices=sorted(P.ROWS))
    ap.add_argument("--batch", type=int, default=P.PAPER_BATCH)
    ap.add_argument("--steps", type=int, default=12, help="solver step cap for DEQ rows (both solves)")
    ap.add_argument("--points", type=int, default=24, help="timeline points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # torch and the model code load only now, once the arguments are understood: `--help` answers at once
    import torch

    from deqlm.bench.core_step import CoreStep
    from deqlm.bench.rows import build_row
    from deqlm.infra import memory
    from deqlm.infra.runtime import set_threads

    set_threads(args.threads)
    extra = list(args.set)
    if P.get_row(args.row).core == "deq":
        extra = ["deq.f_tol=0", "deq.b_tol=0", f"deq.f_max_iter={args.steps}", f"deq.b_max_iter={args.steps}",
                 *extra]
    cpu = torch.device("cpu")
    peak = memory.PeakMemory(cpu)
    peak.start()
    try:
        built = build_row(args.row, "full", batch=args.batch, extra=extra, device=cpu)
        step = CoreStep(built, args.batch, P.PAPER_TGT_LEN, P.PAPER_MEM_LEN, cpu)
        with torch.no_grad():
            step.mems = step.forward(train=False)[1].mems
        step.materialise_optimizer_state()
        peak.begin_window()
        step.step()
        peak.end_window()
    finally:
        prof = peak._prof
        peak._prof = None
        prof.__exit__(None, None, None)
    events = prof.profiler.kineto_results.events()
    mark = [e for e in events if e.name() == memory.WINDOW_MARK][-1]
    t0, t1 = mark.start_ns(), mark.end_ns()
    live, trace = 0, []
    for t, live in memory.running_live(memory.memory_events(events)):
        if t0 <= t <= t1:
            trace.append((t, live))
    start_live = trace[0][1] if trace else live
    top, t_peak = max(((b, t) for t, b in trace), default=(live, t0))
    mib = 2**20
    print(f"{args.row}: peak {top / mib:.1f} MiB, at the step's start {start_live / mib:.1f} MiB")
    running = [e for e in events if e.name() not in ("[memory]", memory.WINDOW_MARK)
               and e.start_ns() <= t_peak <= e.end_ns()]
    for e in sorted(running, key=lambda e: e.start_ns())[:8]:
        print(f"  running at the peak: {e.name()}")
    i = 0
    for k in range(args.points + 1):
        tk = t0 + (t1 - t0) * k // args.points
        while i < len(trace) and trace[i][0] <= tk:
            i += 1
        at = trace[i - 1][1] if i else start_live
        print(f"  {100 * k // args.points:3d}% of the step: {at / mib:8.1f} MiB")


if __name__ == "__main__":
    main()
