"""How close a trained DEQ's forward solves get to its fixed point, by solver and step cap (validation only).

    python scripts/solver_probe.py RUN [--solvers broyden,anderson] [--caps 12,20,30,45] [--tol 1e-3]
                                   [--tgt-lens 70] [--max-tokens 20000]

Loads the run's evaluated checkpoint (as `python -m deqlm.eval` does), then evaluates the validation split
with each forward solver, cap and segment length (the length of the sequence one solve covers) and prints one
JSON object per setting: mean solver steps, mean relative residual, converged fraction, perplexity and
tokens/s. It chooses solver settings, so it never reads the test
split (results/README.md, "Protocol"); it writes nothing into the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def probe(run_dir: Path, solvers: list[str], caps: list[int], tol: float, max_tokens: int,
          tgt_lens: list[int] | None = None) -> list[dict]:
    from deqlm.deq.layer import DEQFixedPoint  # noqa: PLC0415 - after parsing: --help answers without torch
    from deqlm.eval.loop import evaluate  # noqa: PLC0415
    from deqlm.eval.perplexity import load_run  # noqa: PLC0415
    from deqlm.eval.settings import EvalRequest  # noqa: PLC0415
    from deqlm.infra.run_folder import RunFolder  # noqa: PLC0415

    run = load_run(RunFolder(run_dir), EvalRequest(splits=("valid",)))
    layers = [m for m in run.model.modules() if isinstance(m, DEQFixedPoint)]
    if not layers:
        raise SystemExit(f"error: {run_dir}: not a DEQ run (no equilibrium layer in its model)")
    rows = []
    for solver in solvers:
        for layer in layers:
            layer.f_solver = solver
        for tgt_len in tgt_lens or [run.settings.tgt_len]:
            for cap in caps:
                settings = dataclasses.replace(run.settings, f_max_iter=cap, f_tol=tol, f_solver=solver,
                                               tgt_len=tgt_len)
                res = evaluate(run.model, run.dataset, "valid", settings, run.step, run.device,
                               max_tokens=max_tokens)
                rows.append({"run": str(run_dir), "step": run.step, "solver": solver, "tgt_len": tgt_len,
                             "cap": cap, "tol": tol,
                             **{k: res.get(k) for k in ("f_nstep", "f_rel_res", "converged_frac", "ppl",
                                                        "n_tokens", "tokens_per_s")}})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained DEQ run directory")
    parser.add_argument("--solvers", default="broyden,anderson", help="comma-separated forward solvers")
    parser.add_argument("--caps", default="12,20,30,45", help="comma-separated forward step caps")
    parser.add_argument("--tgt-lens", default="", help="comma-separated segment lengths (default: the run's)")
    parser.add_argument("--tol", type=float, default=1e-3, help="forward tolerance (the run's stop mode)")
    parser.add_argument("--max-tokens", type=int, default=20000,
                        help="validation tokens per setting (0: the whole split)")
    args = parser.parse_args(argv)
    try:
        caps = [int(c) for c in args.caps.split(",")]
        tgt_lens = [int(c) for c in args.tgt_lens.split(",") if c]
    except ValueError:
        parser.error("--caps and --tgt-lens take comma-separated integers")
    probe(args.run, args.solvers.split(","), caps, args.tol, args.max_tokens, tgt_lens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
