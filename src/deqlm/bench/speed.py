"""`python -m deqlm.bench speed`: training-step and inference time of each DEQ model and its unrolled
baseline.

    python -m deqlm.bench speed [--device cpu|cuda] [--size full|reduced] [--pairs NAME ...] [--out DIR]
    python -m deqlm.bench speed --row wt103-deq-trellisnet --json      # one row, this process

Protocol: the memory benchmark's (batch 15, sequence 150, Transformer memory 150, the core on random
embedded inputs, no embedding or softmax: the softmax costs DEQ and unrolled models the same, so leaving it
out can only raise the DEQ / unrolled ratio). Each row runs in a fresh process: `--untimed-steps` training
steps, then `--steps` timed training steps (forward, backward and optimizer timed apart) and `--steps` timed
inference forwards (eval mode, no graph, memory carried). Solver limits are the rows' training limits
(f_thres / b_thres of the paper's scripts); `--tol cap` (default) sets the tolerances to 0 so every solve
takes all the steps it is allowed (a trained DEQ mostly does; an untrained one converges early and would look
too fast), `--tol config` keeps the YAML's tolerances. Reported per pair: DEQ / unrolled training and
inference time against the paper's Table 4 (2.82x / 1.76x against the 18-layer Transformer-XL, 2.40x / 1.64x
against the 70-layer TrellisNet). Outputs (written by report.py): speed.json, speed.md, speed.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from deqlm.bench import child, cli, report
from deqlm.bench import protocol as P
from deqlm.bench.core_step import CoreStep
from deqlm.bench.rows import build_row
from deqlm.eval.settings import resolve_eval_settings
from deqlm.infra.exits import BAD_INPUT, OK, error
from deqlm.infra.runtime import describe_device
from deqlm.models.dropout import fill_parametrization_cache

QUICK_PAIRS = ("wt103-transformer-small", "ptb-trellisnet")


class Clock:
    """Wall-clock milliseconds with a device synchronisation at each reading (CUDA kernels are async)."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1e3


def time_row(key: str, device: torch.device, size: str, *, batch: int, tgt_len: int, mem_len: int,
             extra: list[str], tol: str, steps: int, untimed_steps: int) -> dict:
    """Training-step and inference timings of row `key` in this process."""
    row = P.get_row(key)
    if tol == "cap" and row.core == "deq":
        extra = ["deq.f_tol=0", "deq.b_tol=0", *extra]
    built = build_row(key, size, batch=batch, tgt_len=tgt_len, mem_len=mem_len, extra=extra, device=device)
    cfg = built.cfg
    step = CoreStep(built, batch, tgt_len, mem_len, device)
    clock = Clock(device)
    for _ in range(untimed_steps):
        step.step()
    train = _time_training(step, clock, steps)
    built.model.eval()
    # tol cap: inference solves run to their cap too, whatever the layer's own tolerance
    cap = resolve_eval_settings(cfg)  # a DEQ's inference runs at its evaluation cap
    solver = {"max_iter": cap.f_max_iter, "tol": 0.0 if tol == "cap" else cap.f_tol}
    solver = solver if cfg.model.core == "deq" else None
    infer = _time_inference(step, clock, untimed_steps, steps, solver)
    med = statistics.median
    train_ms = med(f + b + o for f, b, o in zip(train["fwd"], train["bwd"], train["opt"]))
    fwd, bwd, infer_ms = med(train["fwd"]), med(train["bwd"]), med(infer["ms"])
    tokens = batch * tgt_len
    rec = {
        "key": key, "row": row.row, "core": cfg.model.core, "arch": cfg.model.arch, "size": size,
        "device": describe_device(device), "status": "ok", "reason": "", "experiment": built.experiment,
        "overrides": built.overrides, "batch": batch, "tgt_len": tgt_len, "mem_len": mem_len, "tol": tol,
        "n_layer": None if cfg.model.core == "deq" else cfg.model.n_layer, "d_model": cfg.model.d_model,
        "params_core": sum(p.numel() for p in built.params), "steps": steps, "untimed_steps": untimed_steps,
        "train_step_ms": round(train_ms, 2), "fwd_ms": round(fwd, 2), "bwd_ms": round(bwd, 2),
        "optim_ms": round(med(train["opt"]), 2), "infer_ms": round(infer_ms, 2),
        "train_tok_s": round(tokens / train_ms * 1e3, 1), "infer_tok_s": round(tokens / infer_ms * 1e3, 1),
        "fwd_share": round(fwd / (fwd + bwd), 3),
    }
    if cfg.model.core == "deq":
        rec.update(_solver_figures(cfg.deq, cap.f_max_iter, train, infer, fwd, bwd))
        with torch.no_grad():
            rec["f_eval_ms"] = round(time_f_eval(step, clock), 3)
        rec["ms_per_infer_step"] = report.infer_step_ms(rec)
    return rec


def _time_training(step: CoreStep, clock: Clock, steps: int) -> dict[str, list]:
    """Forward, backward and optimizer milliseconds of `steps` training steps, and their solver steps."""
    out: dict[str, list] = {"fwd": [], "bwd": [], "opt": [], "f_nstep": [], "b_nstep": []}
    for _ in range(steps):
        step.optimizer.zero_grad(set_to_none=True)
        t0 = clock.now()
        loss, core_out = step.forward()
        t1 = clock.now()
        loss.backward()
        t2 = clock.now()
        step.clip_and_update()
        t3 = clock.now()
        step.mems = core_out.mems
        out["fwd"].append(t1 - t0)
        out["bwd"].append(t2 - t1)
        out["opt"].append(t3 - t2)
        out["f_nstep"].append(core_out.stats.get("f_nstep"))
        out["b_nstep"].append(core_out.stats.get("b_nstep"))
    return out


def _time_inference(step: CoreStep, clock: Clock, untimed_steps: int, steps: int,
                    solver: dict | None) -> dict:
    """Milliseconds and forward solver steps of `steps` graph-free forwards (memory carried), after
    `untimed_steps` untimed ones."""
    ms, f_nstep = [], []
    with torch.no_grad():
        for _ in range(untimed_steps + steps):
            t0 = clock.now()
            _, out = step.forward(train=False, solver=solver)
            ms.append(clock.now() - t0)
            step.mems = out.mems
            f_nstep.append(out.stats.get("f_nstep"))
    return {"ms": ms[untimed_steps:], "f_nstep": f_nstep[untimed_steps:]}


def _solver_figures(d, eval_cap: int, train: dict, infer: dict, fwd_ms: float, bwd_ms: float) -> dict:
    """A DEQ row's solver settings, mean steps taken, and time per forward and backward solver step."""
    f_n, b_n = _mean(train["f_nstep"]), _mean(train["b_nstep"])
    return {
        "f_solver": d.f_solver, "b_solver": d.b_solver,
        "f_max_iter": d.f_max_iter, "b_max_iter": d.b_max_iter,
        "eval_f_max_iter": eval_cap, "f_nstep": f_n, "b_nstep": b_n,
        "infer_f_nstep": _mean(infer["f_nstep"]),
        "ms_per_f_step": round(fwd_ms / f_n, 3) if f_n else None,
        "ms_per_b_step": round(bwd_ms / b_n, 3) if b_n else None,
    }


def time_f_eval(step: CoreStep, clock: Clock, reps: int = 3) -> float:
    """Milliseconds of one application of f (the cell) without a graph: a solver step's floor."""
    cell = step.model.cell_list[0]
    with parametrize.cached():
        fill_parametrization_cache(step.model)
        ctx = cell.context(step.u_BLE, step.mems[0], step.model.clamp_len)
        z = cell.init_state(step.u_BLE)
        z = cell(z, ctx)
        t0 = clock.now()
        for _ in range(reps):
            z = cell(z, ctx)
        return (clock.now() - t0) / reps


def _mean(xs: list) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return round(sum(xs) / len(xs), 2) if xs else None


def time_args(row: P.PaperRow, device: torch.device, args: argparse.Namespace) -> dict:
    """`time_row` with the settings of a `--row` command line."""
    return time_row(row.key, device, args.size, batch=args.batch, tgt_len=args.tgt_len, mem_len=args.mem_len,
                    extra=list(args.set), tol=args.tol, steps=args.steps, untimed_steps=args.untimed_steps)


# ---------------------------------------------------------------------------------------------------------
# Pairs, each row in a fresh process.


def pair_record(name: str, deq: dict, exp: dict, args: argparse.Namespace) -> dict:
    paper = P.PAPER_SPEED.get(name, {})
    ok = deq.get("status") == "ok" and exp.get("status") == "ok"
    rec = {
        "pair": name, "device": deq.get("device", args.device), "size": args.size,
        "status": "ok" if ok else "skipped",
        "reason": "" if ok else "; ".join(f"{r['key']}: {r.get('reason')}" for r in (deq, exp)
                                          if r.get("status") != "ok"),
        # "explicit_row" / "explicit": the unrolled row, under the keys the committed speed JSON files use
        "deq_row": deq["row"], "explicit_row": exp["row"],
        "train_ratio": round(deq["train_step_ms"] / exp["train_step_ms"], 3) if ok else None,
        "infer_ratio": round(deq["infer_ms"] / exp["infer_ms"], 3) if ok else None,
        "paper_train_ratio": paper.get("train"), "paper_infer_ratio": paper.get("infer"),
        "f_max_iter": deq.get("f_max_iter"), "b_max_iter": deq.get("b_max_iter"),
        "eval_f_max_iter": deq.get("eval_f_max_iter"), "f_nstep": deq.get("f_nstep"),
        "b_nstep": deq.get("b_nstep"), "tol": args.tol, "batch": args.batch, "tgt_len": args.tgt_len,
        "deq": deq, "explicit": exp,
    }
    if ok and paper:
        rec["train_below_paper"] = rec["train_ratio"] < paper["train"]
        rec["infer_below_paper"] = rec["infer_ratio"] < paper["infer"]
    return rec


def run_row(args: argparse.Namespace, r: P.PaperRow, say) -> dict:
    """Row `r` timed in a fresh `python -m deqlm.bench speed --row ...` process."""
    say(f"[speed] {r.key} ({args.size}, {args.device}) ...")
    argv = child.child_argv(args, r.key, batch=args.batch, tgt_len=args.tgt_len, mem_len=args.mem_len,
                            own=["--steps", str(args.steps), "--untimed-steps", str(args.untimed_steps)])
    rec = {"key": r.key, "row": r.row, "core": r.core, **child.run_row("speed", args, argv, parse_args,
                                                                          time_args)}
    say(f"[speed] {r.key}: {rec.get('status')} train {rec.get('train_step_ms')} ms, infer "
        f"{rec.get('infer_ms')} ms, f/b steps {rec.get('f_nstep')}/{rec.get('b_nstep')} "
        f"{rec.get('reason', '')}")
    return rec


def run_pairs(args: argparse.Namespace, say) -> list[dict]:
    table = P.pairs()
    names = args.pairs or list(table)
    for n in names:
        if n not in table:
            raise ValueError(f"--pairs {n!r} is not one of {', '.join(table)}")
    cache: dict[str, dict] = {}
    records = []
    for name in names:
        for r in table[name]:
            if r.key not in cache:
                cache[r.key] = run_row(args, r, say)
        deq_row, exp_row = table[name]
        rec = pair_record(name, cache[deq_row.key], cache[exp_row.key], args)
        say(f"[speed] {name}: train x{rec['train_ratio']} (paper {rec['paper_train_ratio']}), "
            f"infer x{rec['infer_ratio']} (paper {rec['paper_infer_ratio']})")
        records.append(rec)
        report.write_speed(Path(args.out), records)  # after every pair: a killed run keeps what it measured
    return records


# ---------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.speed_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.size = "quick"
        args.pairs = args.pairs or list(QUICK_PAIRS)
        args.steps = min(args.steps, 2)
        args.inprocess = True
    if args.size is None:
        args.size = "full" if args.device == "cuda" else "reduced"
    if args.steps <= 0 or args.untimed_steps < 0:
        p.error("--steps must be positive and --untimed-steps non-negative")
    return cli.fill_protocol_defaults(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.row:
            child.answer_row(args, time_args)
            return OK
        say = cli.progress(args)
        records = run_pairs(args, say)
        if args.json:
            for rec in records:
                print(json.dumps({k: v for k, v in rec.items() if k not in ("deq", "explicit")}))
        say(f"[speed] wrote {args.out}/speed.md")
        return OK
    except (ValueError, FileNotFoundError) as exc:
        return error(str(exc), BAD_INPUT)
