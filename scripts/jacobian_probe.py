"""The spectral radius of a trained DEQ's Jacobian J_f(z*) at its equilibria, on validation segments.

    python scripts/jacobian_probe.py RUN [--segments 20] [--power-iters 50] [--seed 0]

Loads the run's evaluated checkpoint (as `python -m deqlm.eval` does), solves the first validation segments
with the run's evaluation settings and memory carried, and estimates, for each column of each segment, the
spectral radius of J_f at the solve's end by power iteration (`deqlm.deq.spectral_radius`). Prints one JSON
object: the radius's mean, median and maximum over columns, the solves' mean relative residual, and the
checkpoint's step. A radius above 1 means the plain iteration z <- f(z) does not contract there, which a
quasi-Newton solver can survive and the spectral penalty (`model.jac_norm=spectral`) pushes down. It reads
validation only and writes nothing into the run folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path


def probe(run_dir: Path, segments: int, power_iters: int, seed: int = 0) -> dict:
    import torch  # noqa: PLC0415 - after parsing: --help answers without torch

    from deqlm.deq import spectral_radius  # noqa: PLC0415
    from deqlm.eval.perplexity import load_run  # noqa: PLC0415
    from deqlm.eval.settings import EvalRequest  # noqa: PLC0415
    from deqlm.infra.run_folder import RunFolder  # noqa: PLC0415

    run = load_run(RunFolder(run_dir), EvalRequest(splits=("valid",)))
    torch.manual_seed(seed)  # the power iteration's random start vectors
    model, settings = run.model.eval(), run.settings
    if settings.f_max_iter is None or len(model.cell_list) != 1:
        raise SystemExit(f"error: {run_dir}: not a DEQ run (no forward solver in its evaluation settings)")
    cell, call = model.cell_list[0], settings.model_kwargs()
    clamp_len = model.clamp_len if call.get("clamp_len") is None else call["clamp_len"]
    rho, res = [], []
    mems = model.init_mems(settings.batch_size)
    batches = run.dataset.eval_batches("valid", settings.batch_size, settings.tgt_len)
    for _, (x_BL, _y_BL) in zip(range(segments), batches):
        x_BL = x_BL.to(run.device)
        with torch.no_grad():
            ctx = cell.context(model.embed(x_BL), mems[0], clamp_len)
            _, out = model.next_token_logp(x_BL, mems, run.step, **call)
        f = functools.partial(cell, ctx=ctx)
        rho += spectral_radius(f, out.z, power_iters, per_sample=True).tolist()
        res.append(float(out.stats["f_rel_res"]))
        mems = out.mems
    return {"run": str(run_dir), "step": run.step, "segments": len(res), "columns": len(rho),
            "power_iters": power_iters, "rho_mean": statistics.fmean(rho),
            "rho_median": statistics.median(rho), "rho_max": max(rho),
            "f_rel_res_mean": statistics.fmean(res)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained DEQ run directory")
    parser.add_argument("--segments", type=int, default=20, help="validation segments to probe")
    parser.add_argument("--power-iters", type=int, default=50, help="power-iteration steps per segment")
    parser.add_argument("--seed", type=int, default=0, help="seed of the power iteration's start vectors")
    args = parser.parse_args(argv)
    if args.segments < 1 or args.power_iters < 1:
        parser.error("--segments and --power-iters take positive integers")
    print(json.dumps(probe(args.run, args.segments, args.power_iters, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
