"""`python -m deqlm.bench memory`: training memory of the paper's models, DEQ against unrolled depth.

    python -m deqlm.bench memory --paper [--device cpu|cuda] [--size full|reduced] [--out results/bench]
    python -m deqlm.bench memory --sweep [--size reduced|full]
    python -m deqlm.bench memory --row wt103-deq-transformer-small --json      # one row, this process

Protocol (docs/paper.md §1, memory column): sequence length 150, batch 15, Transformer memory 150, word
embeddings excluded by feeding the core random embedded inputs (no embedding or softmax tables, no logits; the
loss is the mean square of the core's readout). Every row runs in a fresh process: build, one priming training
step (it also fills the Transformer-XL memory and creates the Adam state), then one measured training step.
Per row: peak training memory of the measured step (params, grads, optimizer state, activations and solver
buffers, whatever is live), bytes saved for backward, parameter + optimizer bytes and the solver workspace.
Outputs (written by report.py): memory.json (one object per row and pair), memory.sweep.json, memory.md,
memory.paper.png, memory.sweep.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deqlm.bench import child, cli, report
from deqlm.bench import protocol as P
from deqlm.bench.core_step import CoreStep
from deqlm.bench.rows import BuiltRow, build_row, solver_workspace_bytes
from deqlm.config import load_config
from deqlm.infra.exits import BAD_INPUT, OK, error
from deqlm.infra.memory import GIB, PeakMemory, SavedTensorMeter, limit_cpu_memory
from deqlm.infra.runtime import describe_device

QUICK = {"depths": (1, 3), "steps": (2, 6), "seq_lens": (8, 16),
         "rows": ("wt103-txl-small-4l", "wt103-txl-small-tied-16l", "wt103-deq-transformer-small",
                  "ptb-trellisnet-60l", "ptb-deq-trellisnet")}
HUMAN_KEYS = ("key", "status", "reason", "peak_train_mem_gib", "activation_gib", "paper_mem_gib", "f_nstep",
              "b_nstep", "step_s")


# ---------------------------------------------------------------------------------------------------------
# One row in this process.


def measure_row(key: str, device: torch.device, size: str, *, batch: int, tgt_len: int, mem_len: int,
                extra: list[str], prime: str = "step", tol: str = "cap", cap_memory: bool = True) -> dict:
    """Peak memory of one training step of row `key` (after a priming step) in the current process."""
    rec: dict = {"key": key, "device": describe_device(device), "size": size, "batch": batch,
                 "tgt_len": tgt_len, "mem_len": mem_len, "prime": prime}
    if device.type == "cpu" and cap_memory:  # fresh processes only: the cap would outlive the call
        rec["address_space_cap_gib"] = round(limit_cpu_memory() / GIB, 2)
    peak = PeakMemory(device)
    peak.start()
    try:
        return _measure(key, device, size, peak, rec, batch=batch, tgt_len=tgt_len, mem_len=mem_len,
                        extra=extra, prime=prime, tol=tol)
    finally:
        peak.close()


def _measure(key: str, device: torch.device, size: str, peak: PeakMemory, rec: dict, *, batch: int,
             tgt_len: int, mem_len: int, extra: list[str], prime: str, tol: str) -> dict:
    t0 = time.perf_counter()
    if tol == "cap" and P.get_row(key).core == "deq":
        extra = ["deq.f_tol=0", "deq.b_tol=0", *extra]
    built = build_row(key, size, batch=batch, tgt_len=tgt_len, mem_len=mem_len, extra=extra, device=device)
    rec.update(_row_facts(built))
    rec["tol"] = tol
    step = CoreStep(built, batch, tgt_len, mem_len, device)
    if prime == "step":
        step.step()
    else:  # light: memory filled by a graph-free forward, optimizer state created with zero gradients
        with torch.no_grad():
            step.mems = step.forward(train=False)[1].mems
        step.materialise_optimizer_state()
    rec["prime_s"] = round(time.perf_counter() - t0, 2)
    meter = SavedTensorMeter(exclude=built.params)
    t1 = time.perf_counter()
    peak.begin_window()
    step.step(meter)
    peak.end_window()
    rec["step_s"] = round(time.perf_counter() - t1, 2)
    mem = peak.result()
    rec.update(step.tensor_bytes())
    rec.update({
        "status": "ok", "reason": "",
        "peak_train_mem_bytes": mem["peak_bytes"], "peak_train_mem_gib": round(mem["peak_bytes"] / GIB, 4),
        "peak_method": mem["method"], "rss_peak_delta_gib": round(mem["rss_peak_delta_bytes"] / GIB, 4),
        "activation_bytes": meter.bytes, "activation_gib": round(meter.bytes / GIB, 4),
        "solver_workspace_bytes": solver_workspace_bytes(built.cfg, batch, tgt_len),
        "f_nstep": step.stats.get("f_nstep"), "b_nstep": step.stats.get("b_nstep"),
    })
    return rec


def _row_facts(built: BuiltRow) -> dict:
    m, d = built.cfg.model, built.cfg.deq
    deq = m.core == "deq"
    return {
        "row": built.row.row, "corpus": built.row.corpus, "core": m.core, "arch": m.arch,
        "paper_mem_gib": built.row.paper_mem_gib, "experiment": built.experiment,
        "overrides": built.overrides, "n_layer": None if deq else m.n_layer, "weight_tied": m.weight_tied,
        "grad_checkpoint": m.grad_checkpoint,
        "d_model": m.d_model, "d_embed": m.d_embed, "d_inner": m.d_inner if m.arch == "transformer" else None,
        "f_solver": d.f_solver if deq else None, "b_solver": d.b_solver if deq else None,
        "f_max_iter": d.f_max_iter if deq else None, "b_max_iter": d.b_max_iter if deq else None,
        "f_tol": d.f_tol if deq else None, "b_tol": d.b_tol if deq else None,
        "broyden_rank": d.broyden_rank if deq else None,
    }


def measure_args(row: P.PaperRow, device: torch.device, args: argparse.Namespace) -> dict:
    """`measure_row` with the settings of a `--row` command line."""
    return measure_row(row.key, device, args.size, batch=args.batch, tgt_len=args.tgt_len,
                       mem_len=args.mem_len, extra=list(args.set), prime=args.prime, tol=args.tol,
                       cap_memory=not args.inprocess)


# ---------------------------------------------------------------------------------------------------------
# Many rows, each in a fresh process.


def run_one(args: argparse.Namespace, key: str, *, batch: int, tgt_len: int, mem_len: int,
            extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Row `key` at this protocol, in a fresh `python -m deqlm.bench memory --row ...` process."""
    argv = child.child_argv(args, key, batch=batch, tgt_len=tgt_len, mem_len=mem_len, extra=extra,
                            own=["--prime", args.prime])
    return child.run_row("memory", args, argv, parse_args, measure_args)


def _row_header(r: P.PaperRow, args: argparse.Namespace) -> dict:
    return {"key": r.key, "row": r.row, "core": r.core, "corpus": r.corpus, "paper_mem_gib": r.paper_mem_gib,
            "size": args.size, "device": args.device}


def run_paper(args: argparse.Namespace, say) -> list[dict]:
    """Every row with a memory figure, one fresh process each; one output object per (row, pair)."""
    for key in args.rows or ():
        P.get_row(key)  # ValueError naming the valid rows
    rows = [P.ROWS[k] for k in args.rows] if args.rows else list(P.PAPER_ROWS)  # --rows sets the order
    # every row is in the output from the start, so a run cut short says which rows it never reached
    done: dict[str, list[dict]] = {
        r.key: [{**_row_header(r, args), "pair": p, "status": "skipped",
                 "reason": "not reached (the run was stopped before this row)",
                 "peak_train_mem_gib": None, "activation_bytes": None} for p in r.pairs] for r in rows}
    for r in rows:
        say(f"[memory] {r.key} ({args.size}, {args.device}) ...")
        rec = {**_row_header(r, args),
               **run_one(args, r.key, batch=args.batch, tgt_len=args.tgt_len, mem_len=args.mem_len)}
        rec.setdefault("reason", "")
        too_big = any(w in rec.get("reason", "") for w in ("out of memory", "timed out"))
        if rec.get("status") != "ok" and r.core == "unrolled" and args.project and too_big:
            rec.update(project_depth(args, r, say))
        say(f"[memory] {r.key}: {rec.get('status')} peak {rec.get('peak_train_mem_gib')} GiB "
            f"(paper {r.paper_mem_gib} GB) {rec.get('reason', '')}")
        done[r.key] = [{**rec, "pair": p} for p in r.pairs]
        # after every row: a killed run keeps what it measured
        report.write_memory_paper(Path(args.out), [x for recs in done.values() for x in recs])
        report.write_memory_md(Path(args.out))
    return [x for recs in done.values() for x in recs]


def project_depth(args: argparse.Namespace, r: P.PaperRow, say) -> dict:
    """A row too big for the host's memory: measure it at two shallow depths and extrapolate linearly in depth
    (unrolled-depth memory is affine in the number of layers). Reported as `projected_peak_gib`, never as a
    measurement."""
    depths = (2, 4)
    peaks = []
    for n in depths:
        say(f"[memory] {r.key}: projection point n_layer={n}")
        rec = run_one(args, r.key, batch=args.batch, tgt_len=args.tgt_len, mem_len=args.mem_len,
                      extra=[f"model.n_layer={n}"])
        if rec.get("status") != "ok":
            return {"projected_peak_gib": None}
        peaks.append(rec["peak_train_mem_gib"])
    n_full = _yaml_depth(r)
    if n_full is None:
        return {"projected_peak_gib": None}
    slope = (peaks[1] - peaks[0]) / (depths[1] - depths[0])
    proj = peaks[0] + slope * (n_full - depths[0])
    return {"projected_peak_gib": round(proj, 3),
            "projection": f"linear in depth from n_layer {depths[0]}, {depths[1]}: "
                          f"{peaks[0]:.3f}, {peaks[1]:.3f} GiB"}


def _yaml_depth(r: P.PaperRow) -> int | None:
    try:
        path, overrides = P.find_experiment(r)
        return load_config(path, list(overrides)).model.n_layer
    except (FileNotFoundError, ValueError):
        return None


def sweep_plan(args: argparse.Namespace) -> list[tuple[str, str, int, dict]]:
    """(axis, row key, x, child kwargs) for the three sweeps."""
    quick = args.quick
    depths = args.depths or (QUICK["depths"] if quick else P.SWEEP_DEPTHS)
    steps = args.solver_steps or (QUICK["steps"] if quick else P.SWEEP_SOLVER_STEPS)
    lens = args.seq_lens or (QUICK["seq_lens"] if quick else P.SWEEP_SEQ_LENS)
    b, L, M = args.batch, args.tgt_len, args.mem_len
    plan = []
    for key in ("wt103-txl-small-4l", "ptb-trellisnet-60l"):
        for n in depths:
            plan.append(("depth", key, n, {"batch": b, "tgt_len": L, "mem_len": M,
                                           "extra": [f"model.n_layer={n}"]}))
    # Solver caps with tolerance 0: the solver takes every step it is allowed (Broyden may still stop early on
    # stagnation; the steps it took are recorded).
    for key in report.DEQ_SWEEP_ROWS:
        for s in steps:
            plan.append(("solver_steps", key, s, {"batch": b, "tgt_len": L, "mem_len": M,
                                                  "extra": [f"deq.f_max_iter={s}", f"deq.b_max_iter={s}",
                                                            "deq.f_tol=0", "deq.b_tol=0"]}))
    for key in ("wt103-txl-small-4l", "wt103-deq-transformer-small"):
        for n in lens:
            plan.append(("seq_len", key, n, {"batch": b, "tgt_len": n, "mem_len": n, "extra": []}))
    return plan


def run_sweep(args: argparse.Namespace, say) -> list[dict]:
    records = []
    for axis, key, x, kw in sweep_plan(args):
        say(f"[memory sweep] {axis}={x} {key} ...")
        r = P.get_row(key)
        rec = {**_row_header(r, args), "axis": axis, "x": x, **run_one(args, key, **kw)}
        rec.setdefault("reason", "")
        say(f"[memory sweep] {axis}={x} {key}: {rec.get('status')} peak {rec.get('peak_train_mem_gib')} GiB, "
            f"saved {rec.get('activation_gib')} GiB {rec.get('reason', '')}")
        records.append(rec)
        report.write_memory_sweep(Path(args.out), records)
        report.write_memory_md(Path(args.out))
    return records


# ---------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.memory_parser()
    args = p.parse_args(argv)
    if not (args.paper or args.sweep or args.row):
        p.error("choose --paper, --sweep or --row NAME")
    if args.size is None:
        args.size = "full" if args.paper or args.row or args.device == "cuda" else "reduced"
    if args.quick:
        args.size = "quick"
        args.rows = args.rows or list(QUICK["rows"])
        args.inprocess = True
    return cli.fill_protocol_defaults(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.row:
            child.answer_row(args, measure_args, HUMAN_KEYS)
            return OK
        say = cli.progress(args)
        for wanted, run in ((args.paper, run_paper), (args.sweep, run_sweep)):
            if wanted:
                records = run(args, say)
                if args.json:
                    for rec in records:
                        print(json.dumps(rec))
        out = Path(args.out)
        report.write_memory_md(out)
        say(f"[memory] wrote {out}/memory.md")
        return OK
    except (ValueError, FileNotFoundError) as exc:
        return error(str(exc), BAD_INPUT)
