"""`python -m deqlm.bench speed`: training-step and inference time of each DEQ model and its explicit twin.

    python -m deqlm.bench speed [--device cpu|cuda] [--size full|reduced] [--pairs NAME ...] [--out DIR]
    python -m deqlm.bench speed --row wt103-deq-trellisnet --json      # one row, this process

Protocol: the memory benchmark's (batch 15, sequence 150, Transformer memory 150, the core on random
embedded inputs, no embedding or softmax: the softmax costs DEQ and explicit models the same, so leaving it
out can only raise the DEQ / explicit ratio). Each row runs in a fresh process: `--warmup-steps` training
steps, then
`--steps` timed training steps (forward, backward and optimizer timed apart) and `--steps` timed inference
forwards (eval mode, no graph, memory carried). Solver limits are the rows' training limits (f_thres /
b_thres of the paper's scripts); `--tol cap` (default) sets the tolerances to 0 so every solve takes all the
steps it is allowed (a trained DEQ mostly does; an untrained one converges early and would look too fast),
`--tol config` keeps the YAML's tolerances. Reported per pair: DEQ / explicit training and inference time
against the paper's Table 4 (2.82x / 1.76x against the 18-layer Transformer-XL, 2.40x / 1.64x against the
70-layer TrellisNet). Outputs: speed.json, speed.md, speed.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deqlm.bench import cli
from deqlm.bench import common as C
from deqlm.bench import protocol as P
from deqlm.exits import BAD_INPUT, OK, error

QUICK_PAIRS = ("wt103-transformer-small", "ptb-trellisnet")
QUICK = {"batch": 2, "tgt_len": 8, "mem_len": 8}


class Clock:
    """Wall-clock milliseconds with a device synchronisation at each reading (CUDA kernels are async)."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() * 1e3


def time_row(key: str, device: torch.device, size: str, *, batch: int, tgt_len: int, mem_len: int,
             extra: list[str], tol: str, steps: int, warmup_steps: int) -> dict:
    """Training-step and inference timings of row `key` in this process."""
    row = P.get_row(key)
    if tol == "cap" and row.core == "deq":
        extra = ["deq.f_tol=0", "deq.b_tol=0", *extra]
    built = C.build_row(key, size, batch=batch, tgt_len=tgt_len, mem_len=mem_len, extra=extra, device=device)
    cfg = built.cfg
    deq = cfg.model.core == "deq"
    step = C.CoreStep(built, batch, tgt_len, mem_len, device)
    clock = Clock(device)
    for _ in range(warmup_steps):
        step.step()
    fwd, bwd, opt, f_steps, b_steps = [], [], [], [], []
    for _ in range(steps):
        step.optimizer.zero_grad(set_to_none=True)
        t0 = clock.now()
        loss, out = step.forward()
        t1 = clock.now()
        loss.backward()
        t2 = clock.now()
        if step.clip > 0:
            torch.nn.utils.clip_grad_norm_(built.params, step.clip)
        step.optimizer.step()
        t3 = clock.now()
        step.mems = out.mems
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        opt.append(t3 - t2)
        f_steps.append(out.stats.get("f_nstep"))
        b_steps.append(out.stats.get("b_nstep"))
    model = built.model
    model.eval()
    if deq and tol == "cap":
        model.set_eval_solver(f_tol=0.0)
    infer, fi_steps = [], []
    with torch.no_grad():
        for _ in range(warmup_steps + steps):
            t0 = clock.now()
            _, out = step.forward(train=False)
            infer.append(clock.now() - t0)
            step.mems = out.mems
            fi_steps.append(out.stats.get("f_nstep"))
        infer = infer[warmup_steps:]
        fi_steps = fi_steps[warmup_steps:]
        f_eval_ms = time_f_eval(step, clock) if deq else None
    med = statistics.median
    train_ms = med(f + b + o for f, b, o in zip(fwd, bwd, opt))
    tokens = batch * tgt_len
    rec = {
        "key": key, "row": row.row, "core": cfg.model.core, "arch": cfg.model.arch, "size": size,
        "device": C.describe_device(device), "status": "ok", "reason": "", "experiment": built.experiment,
        "overrides": built.overrides, "batch": batch, "tgt_len": tgt_len, "mem_len": mem_len, "tol": tol,
        "n_layer": None if deq else cfg.model.n_layer, "d_model": cfg.model.d_model,
        "params_core": sum(p.numel() for p in built.params), "steps": steps, "warmup_steps": warmup_steps,
        "train_step_ms": round(train_ms, 2), "fwd_ms": round(med(fwd), 2), "bwd_ms": round(med(bwd), 2),
        "optim_ms": round(med(opt), 2), "infer_ms": round(med(infer), 2),
        "train_tok_s": round(tokens / train_ms * 1e3, 1), "infer_tok_s": round(tokens / med(infer) * 1e3, 1),
        "fwd_share": round(med(fwd) / (med(fwd) + med(bwd)), 3),
    }
    if deq:
        d = cfg.deq
        f_n, b_n, fi_n = _mean(f_steps), _mean(b_steps), _mean(fi_steps)
        eval_cap = d.eval_f_max_iter or d.f_max_iter
        rec.update({
            "f_solver": d.f_solver, "b_solver": d.b_solver, "f_max_iter": d.f_max_iter,
            "b_max_iter": d.b_max_iter,
            "eval_f_max_iter": eval_cap, "f_nstep": f_n, "b_nstep": b_n, "infer_f_nstep": fi_n,
            "f_eval_ms": None if f_eval_ms is None else round(f_eval_ms, 3),
            "ms_per_f_step": round(med(fwd) / f_n, 3) if f_n else None,
            "ms_per_b_step": round(med(bwd) / b_n, 3) if b_n else None,
        })
        rec["ms_per_infer_step"] = infer_step_ms(rec)
    return rec


def time_f_eval(step: C.CoreStep, clock: Clock, reps: int = 3) -> float:
    """Milliseconds of one application of f (the cell) without a graph: a solver step's floor."""
    from torch.nn.utils import parametrize

    from deqlm.models.dropout import fill_parametrization_cache

    cell = step.model.layers[0]
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


def run_child(args: argparse.Namespace) -> dict:
    row = P.get_row(args.row)
    base = {"key": row.key, "row": row.row, "core": row.core, "size": args.size, "device": args.device}
    try:
        device = C.pick_device(args.device)
        base["device"] = C.describe_device(device)
        C.set_threads(args.threads)
        torch.manual_seed(0)
        return time_row(row.key, device, args.size, batch=args.batch, tgt_len=args.tgt_len,
                        mem_len=args.mem_len, extra=list(args.set), tol=args.tol, steps=args.steps,
                        warmup_steps=args.warmup_steps)
    except FileNotFoundError as exc:
        return {**base, "status": "skipped", "reason": str(exc)}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {**base, "status": "skipped", "reason": f"out of memory on {args.device}: {_first_line(exc)}"}
    except RuntimeError as exc:
        return {**base, "status": "skipped", "reason": f"failed: {type(exc).__name__}: {_first_line(exc)}"}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


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


def run_pairs(args: argparse.Namespace, say) -> list[dict]:
    table = P.pairs()
    names = args.pairs or list(table)
    for n in names:
        if n not in table:
            raise ValueError(f"--pairs {n!r} is not one of {', '.join(table)}")
    cache: dict[str, dict] = {}
    records = []
    out = Path(args.out)
    for name in names:
        recs = []
        for r in table[name]:
            if r.key not in cache:
                say(f"[speed] {r.key} ({args.size}, {args.device}) ...")
                child = ["--row", r.key, "--device", args.device, "--size", args.size,
                         "--batch", str(args.batch), "--tgt-len", str(args.tgt_len),
                         "--mem-len", str(args.mem_len), "--tol", args.tol,
                         "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                         "--threads", str(args.threads)]
                rec = (run_child(parse_args(child + ["--json"])) if args.inprocess
                       else C.run_fresh("speed", child, args.row_timeout))
                cache[r.key] = {"key": r.key, "row": r.row, "core": r.core, **rec}
                c = cache[r.key]
                say(f"[speed] {r.key}: {c.get('status')} train {c.get('train_step_ms')} ms, infer "
                    f"{c.get('infer_ms')} ms, f/b steps {c.get('f_nstep')}/{c.get('b_nstep')} "
                    f"{c.get('reason', '')}")
            recs.append(cache[r.key])
        rec = pair_record(name, recs[0], recs[1], args)
        say(f"[speed] {name}: train x{rec['train_ratio']} (paper {rec['paper_train_ratio']}), "
            f"infer x{rec['infer_ratio']} (paper {rec['paper_infer_ratio']})")
        records.append(rec)
        write_outputs(out, records)  # after every pair: a killed run keeps what it measured
    return records


# ---------------------------------------------------------------------------------------------------------
# Outputs.


def infer_step_ms(r: dict) -> float | None:
    """Inference time per forward solver step, from a record's `infer_ms` and `infer_f_nstep`: eval mode like
    `f_eval_ms`, so the two compare directly (the training forward also applies dropout masks)."""
    n = r.get("infer_f_nstep")
    return round(r["infer_ms"] / n, 3) if n and r.get("infer_ms") is not None else None


def write_outputs(out: Path, records: list[dict]) -> None:
    from deqlm.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "speed.json", records)
    f = C.fmt
    lines = ["# Speed: DEQ against its explicit twin", "",
             "Protocol: batch 15, sequence 150, Transformer memory 150, the core on random embedded inputs "
             "(no embedding / softmax, which costs both models the same). Median over the timed steps after "
             "warm-up; each row in a fresh process. Solver limits are the rows' training limits; tol `cap` = "
             "tolerance 0, every solve runs to its limit (worst case).", "",
             "| pair | size | DEQ/explicit train | paper | DEQ/explicit infer | paper | f/b cap "
             "| f/b steps | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['pair']} | {r['size']} | {f(r['train_ratio'])} | {f(r['paper_train_ratio'])} | "
                     f"{f(r['infer_ratio'])} | {f(r['paper_infer_ratio'])} | "
                     f"{r['f_max_iter']}/{r['b_max_iter']} | {f(r['f_nstep'], 1)}/{f(r['b_nstep'], 1)} | "
                     f"{r['status']} {r['reason']} |")
    lines += ["", "## Per model", "",
              "| row | core | train step ms | fwd ms | bwd ms | fwd share | infer ms | train tok/s "
              "| infer tok/s | ms per f step (fwd) | ms per b step | ms per f step (infer) "
              "| one f ms (infer) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for pr in records:
        for r in (pr["deq"], pr["explicit"]):
            if r["key"] in seen or r.get("status") != "ok":
                continue
            seen.add(r["key"])
            lines.append(f"| {r['row']} | {r['core']} | {f(r['train_step_ms'], 1)} | {f(r['fwd_ms'], 1)} | "
                         f"{f(r['bwd_ms'], 1)} | {f(r['fwd_share'])} | {f(r['infer_ms'], 1)} | "
                         f"{f(r['train_tok_s'], 0)} | {f(r['infer_tok_s'], 0)} | "
                         f"{f(r.get('ms_per_f_step'))} | "
                         f"{f(r.get('ms_per_b_step'))} | {f(infer_step_ms(r))} | {f(r.get('f_eval_ms'))} |")
    devices = sorted({str(r["device"]) for r in records})
    lines += ["", f"Device: {', '.join(devices)}. Sizes: full = the paper's widths; reduced = widths / 4 "
              "(depth, solver limits and protocol unchanged).", ""]
    atomic_write_text(out / "speed.md", "\n".join(lines) + "\n")
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return
    plt, fig, (ax,) = C.plt_figure(width=8, height=4.4)
    xs = range(len(ok))
    ax.bar([x - 0.3 for x in xs], [r["train_ratio"] for r in ok], width=0.2, label="train (ours)")
    ax.bar([x - 0.1 for x in xs], [r["paper_train_ratio"] or 0 for r in ok], width=0.2, label="train (paper)")
    ax.bar([x + 0.1 for x in xs], [r["infer_ratio"] for r in ok], width=0.2, label="inference (ours)")
    ax.bar([x + 0.3 for x in xs], [r["paper_infer_ratio"] or 0 for r in ok], width=0.2,
           label="inference (paper)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["pair"] for r in ok], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("DEQ time / explicit time (x)")
    ax.set_title(f"DEQ / explicit step time ({ok[0]['device']}, size {ok[0]['size']}, tol {ok[0]['tol']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    plt.close(fig)


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
    args.batch = args.batch or (QUICK["batch"] if args.quick else P.PAPER_BATCH)
    args.tgt_len = args.tgt_len or (QUICK["tgt_len"] if args.quick else P.PAPER_TGT_LEN)
    args.mem_len = args.mem_len if args.mem_len is not None else (
        QUICK["mem_len"] if args.quick else P.PAPER_MEM_LEN)
    if args.row_timeout is None:
        args.row_timeout = 120.0 if args.quick else (300.0 if args.device == "cuda" else 3600.0)
    if args.steps <= 0 or args.warmup_steps < 0:
        p.error("--steps must be positive and --warmup-steps non-negative")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.row:
            rec = run_child(args)
            print(json.dumps(rec) if args.json else "  ".join(f"{k}={v}" for k, v in rec.items()))
            return OK

        def say(msg: str) -> None:
            print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

        records = run_pairs(args, say)
        if args.json:
            for rec in records:
                print(json.dumps({k: v for k, v in rec.items() if k not in ("deq", "explicit")}))
        say(f"[speed] wrote {args.out}/speed.md")
        return OK
    except (ValueError, FileNotFoundError) as exc:
        return error(str(exc), BAD_INPUT)
