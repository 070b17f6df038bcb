"""The DEQ's compute knob at inference: one set of weights, test perplexity at several forward solver caps.

An unrolled model's depth is fixed when it is built; a DEQ's is whatever the solver spends. Evaluating the
same checkpoint with the forward solver capped at 1, 2, 4, ... steps (each at the training tolerance, so a
converged batch still stops early) shows how much of the result the equilibrium carries and what more compute
buys.
The points go to ``solver_caps.json`` next to ``eval.json``; ``deqlm.eval.report`` draws them against the
unrolled baseline's perplexity.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

from deqlm.eval.perplexity import LoadedRun, evaluate_split, load_run
from deqlm.eval.runs import CAPS_FILE, RunError
from deqlm.eval.settings import EvalRequest
from deqlm.io import atomic_write_json

CAPS_SPLIT = "test"


def cap_point(run: LoadedRun, cap: int, max_tokens: int) -> dict:
    """Test figures with the forward solver capped at `cap` steps, at the training tolerance."""
    settings = dataclasses.replace(run.settings, f_max_iter=cap, f_tol=run.cfg.deq.f_tol)
    res = evaluate_split(run.run_dir, run.cfg, run.model, run.dataset, CAPS_SPLIT, settings, run.step,
                         run.device, max_tokens)
    keep = ("ppl", "loss", "n_tokens", "f_nstep", "f_rel_res", "converged_frac", "tokens_per_s", "wall_s")
    return {"cap": cap, "tol": settings.f_tol, **{k: res.get(k) for k in keep}}


def sweep_solver_caps(run_dir: str | Path, req: EvalRequest, *, log=print) -> dict:
    """Evaluate a DEQ run's test split at each of `req.solver_caps` and write solver_caps.json."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, req)
    if run.cfg.model.core != "deq":
        raise RunError(run_dir, "solver caps: an unrolled model has no solver to cap")
    if run.model.mode(run.step) != "deq":
        raise RunError(run_dir, "solver caps: the checkpoint is from the unrolled warm-up, not the DEQ")
    points = []
    for cap in sorted(req.solver_caps):
        points.append(cap_point(run, cap, req.max_tokens))
        p = points[-1]
        shown = f"loss {p['loss']:.4g}" if p["ppl"] is None else f"ppl {p['ppl']:.3f}"
        log(f"{run_dir}: {CAPS_SPLIT} at cap {cap}: {shown} ({p['f_nstep']:.3g} solver steps on average)")
    record = {
        "schema": 1,
        "run": str(run_dir),
        "checkpoint": run.ckpt_info,
        "split": CAPS_SPLIT,
        "partial": bool(req.max_tokens),
        "settings": run.settings.record(req.max_tokens),
        "points": points,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(run_dir / CAPS_FILE, record)
    return record
