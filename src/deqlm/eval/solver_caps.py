"""The DEQ's compute knob at inference: one set of weights, test perplexity at several forward solver caps.

An unrolled model's depth is fixed when it is built; a DEQ's is whatever the solver spends. Evaluating the
same checkpoint with the forward solver capped at 1, 2, 4, ... steps (each at the training tolerance, so a
converged batch still stops early) shows how much of the result the equilibrium carries and what more compute
buys.
The points go to the run folder's solver-cap record, beside its eval record; ``deqlm.eval.report`` draws
them against the unrolled baseline's perplexity.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

from deqlm.eval.perplexity import LoadedRun, evaluate_split, load_run
from deqlm.eval.settings import EvalRequest
from deqlm.infra.run_folder import RunError, RunFolder

CAPS_SPLIT = "test"


def cap_point(run: LoadedRun, cap: int, max_tokens: int) -> dict:
    """Test figures with the forward solver capped at `cap` steps, at the training tolerance."""
    settings = dataclasses.replace(run.settings, f_max_iter=cap, f_tol=run.cfg.deq.f_tol)
    res = evaluate_split(run.folder.path, run.cfg, run.model, run.dataset, CAPS_SPLIT, settings, run.step,
                         run.device, max_tokens)
    keep = ("ppl", "loss", "n_tokens", "f_nstep", "f_rel_res", "converged_frac", "tokens_per_s", "wall_s")
    return {"cap": cap, "tol": settings.f_tol, **{k: res.get(k) for k in keep}}


def sweep_solver_caps(folder: RunFolder | str | Path, req: EvalRequest, *, log=print) -> dict:
    """Evaluate a DEQ run's test split at each of `req.solver_caps` and write the solver-cap record."""
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    run_dir = folder.path
    run = load_run(folder, req)
    if run.cfg.model.core != "deq":
        raise RunError(run_dir, "solver caps: an unrolled model has no solver to cap")
    if run.model.mode(run.step) != "deq":
        raise RunError(run_dir, "solver caps: the checkpoint is from the unrolled pretraining, not the DEQ")
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
    folder.write_solver_caps(record)
    return record


def caps_up_to_date(folder: RunFolder, caps: tuple[int, ...]) -> bool:
    """Whether the solver-cap record holds these caps for the checkpoint the (up-to-date) eval record
    evaluated."""
    record, ev = folder.solver_caps() or {}, folder.eval_record() or {}
    have = sorted(p.get("cap") for p in record.get("points", []))
    return bool(ev) and record.get("checkpoint") == ev.get("checkpoint") and have == sorted(caps)
