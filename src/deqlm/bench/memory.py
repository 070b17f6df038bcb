"""`python -m deqlm.bench memory`: training memory of the paper's models, DEQ against explicit depth.

    python -m deqlm.bench memory --paper [--device cpu|cuda] [--size full|reduced] [--out results/bench]
    python -m deqlm.bench memory --sweep [--size reduced|full]
    python -m deqlm.bench memory --row wt103-deq-transformer-small --json      # one row, this process

Protocol (REFERENCE.md §1, memory column): sequence length 150, batch 15, Transformer memory 150, word
embeddings excluded by feeding the core random embedded inputs (no embedding or softmax tables, no logits; the
loss is the mean square of the core's readout). Every row runs in a fresh process: build, one warm-up training
step (it also fills the Transformer-XL memory and creates the Adam state), then one measured training step.
Per row: peak training memory of the measured step (params, grads, optimizer state, activations and solver
buffers, whatever is live), bytes saved for backward, parameter + optimizer bytes and the solver workspace.
Outputs: memory.json (one object per row and pair), memory.sweep.json, memory.md, memory.paper.png,
memory.sweep.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from deqlm.bench import cli
from deqlm.bench import common as C
from deqlm.bench import protocol as P
from deqlm.exits import BAD_INPUT, OK, error

QUICK = {"depths": (1, 3), "steps": (2, 6), "seq_lens": (8, 16), "batch": 2, "tgt_len": 8, "mem_len": 8,
         "rows": ("wt103-txl-small-4l", "wt103-txl-small-tied-16l", "wt103-deq-transformer-small",
                  "ptb-trellisnet-60l", "ptb-deq-trellisnet")}


# ---------------------------------------------------------------------------------------------------------
# One row in this process.


def measure_row(key: str, device: torch.device, size: str, *, batch: int, tgt_len: int, mem_len: int,
                extra: list[str], warmup: str = "step", tol: str = "cap", cap_memory: bool = True) -> dict:
    """Peak memory of one training step of row `key` (after a warm-up) in the current process."""
    rec: dict = {"key": key, "device": C.describe_device(device), "size": size, "batch": batch,
                 "tgt_len": tgt_len, "mem_len": mem_len, "warmup": warmup}
    if device.type == "cpu" and cap_memory:  # fresh processes only: the cap would outlive the call
        cap = C.limit_cpu_memory()
        rec["address_space_cap_gib"] = None if cap is None else round(cap / C.GIB, 2)
    peak = C.PeakMemory(device)
    peak.start()
    try:
        return _measure(key, device, size, peak, rec, batch=batch, tgt_len=tgt_len, mem_len=mem_len,
                        extra=extra, warmup=warmup, tol=tol)
    finally:
        peak.close()


def _measure(key: str, device: torch.device, size: str, peak: C.PeakMemory, rec: dict, *, batch: int,
             tgt_len: int, mem_len: int, extra: list[str], warmup: str, tol: str) -> dict:
    from deqlm.activation import SavedTensorMeter

    t0 = time.perf_counter()
    if tol == "cap" and P.get_row(key).core == "deq":
        extra = ["deq.f_tol=0", "deq.b_tol=0", *extra]
    built = C.build_row(key, size, batch=batch, tgt_len=tgt_len, mem_len=mem_len, extra=extra, device=device)
    cfg = built.cfg
    rec.update(_row_facts(built))
    rec["tol"] = tol
    step = C.CoreStep(built, batch, tgt_len, mem_len, device)
    if warmup == "step":
        step.step()
    else:  # light: memory filled by a graph-free forward, optimizer state created with zero gradients
        with torch.no_grad():
            step.mems = step.forward(train=False)[1].mems
        step.materialise_optimizer_state()
    rec["warmup_s"] = round(time.perf_counter() - t0, 2)
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
        "peak_train_mem_bytes": mem["peak_bytes"], "peak_train_mem_gib": round(mem["peak_bytes"] / C.GIB, 4),
        "peak_method": mem["method"], "rss_peak_delta_gib": round(mem["rss_peak_delta_bytes"] / C.GIB, 4),
        "activation_bytes": meter.bytes, "activation_gib": round(meter.bytes / C.GIB, 4),
        "solver_workspace_bytes": C.solver_workspace_bytes(cfg, batch, tgt_len),
        "f_nstep": step.stats.get("f_nstep"), "b_nstep": step.stats.get("b_nstep"),
    })
    return rec


def _row_facts(built: C.BuiltRow) -> dict:
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


def run_child(args: argparse.Namespace) -> dict:
    """`--row`: measure in this process; errors come back as a skipped record (the parent keeps going)."""
    row = P.get_row(args.row)
    base = {"key": row.key, "row": row.row, "core": row.core, "corpus": row.corpus,
            "paper_mem_gib": row.paper_mem_gib, "size": args.size, "device": args.device}
    try:
        device = C.pick_device(args.device)
        base["device"] = C.describe_device(device)
        C.set_threads(args.threads)
        return measure_row(row.key, device, args.size, batch=args.batch, tgt_len=args.tgt_len,
                           mem_len=args.mem_len, extra=list(args.set), warmup=args.warmup, tol=args.tol,
                           cap_memory=not args.inprocess)
    except FileNotFoundError as exc:
        return {**base, "status": "skipped", "reason": str(exc)}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {**base, "status": "skipped", "reason": f"out of memory on {args.device}: {_first_line(exc)}"}
    except RuntimeError as exc:
        msg = _first_line(exc)
        if "alloc" in msg.lower() or "out of memory" in msg.lower():
            return {**base, "status": "skipped", "reason": f"out of memory on {args.device}: {msg}"}
        return {**base, "status": "skipped", "reason": f"failed: {type(exc).__name__}: {msg}"}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# ---------------------------------------------------------------------------------------------------------
# Many rows, each in a fresh process.


def child_args(args: argparse.Namespace, key: str, *, batch: int, tgt_len: int, mem_len: int,
               extra: list[str] = ()) -> list[str]:
    out = ["--row", key, "--device", args.device, "--size", args.size, "--batch", str(batch),
           "--tgt-len", str(tgt_len), "--mem-len", str(mem_len), "--warmup", args.warmup, "--tol", args.tol,
           "--threads", str(args.threads)]
    for item in extra:
        out += ["--set", item]
    return out


def run_one(args: argparse.Namespace, child: list[str]) -> dict:
    """A fresh `python -m deqlm.bench memory --row ...` process, or (`--inprocess`, CI) a direct call."""
    if not args.inprocess:
        return C.run_fresh("memory", child, args.row_timeout)
    return run_child(parse_args(child + ["--json", "--inprocess"]))


def run_paper(args: argparse.Namespace, say) -> list[dict]:
    """Every row with a memory figure, one fresh process each; one output object per (row, pair)."""
    for key in args.rows or ():
        P.get_row(key)  # ValueError naming the valid rows
    rows = [P.ROWS[k] for k in args.rows] if args.rows else list(P.PAPER_ROWS)  # --rows sets the order
    # every row is in the output from the start, so a run cut short says which rows it never reached
    done: dict[str, list[dict]] = {
        r.key: [{"key": r.key, "row": r.row, "core": r.core, "corpus": r.corpus, "pair": p,
                 "paper_mem_gib": r.paper_mem_gib, "size": args.size, "device": args.device,
                 "status": "skipped", "reason": "not reached (the run was stopped before this row)",
                 "peak_train_mem_gib": None, "activation_bytes": None} for p in r.pairs] for r in rows}
    for r in rows:
        say(f"[memory] {r.key} ({args.size}, {args.device}) ...")
        rec = run_one(args, child_args(args, r.key, batch=args.batch, tgt_len=args.tgt_len,
                                       mem_len=args.mem_len))
        rec = {"key": r.key, "row": r.row, "core": r.core, "corpus": r.corpus,
               "paper_mem_gib": r.paper_mem_gib, "size": args.size, "device": args.device, **rec}
        rec.setdefault("reason", "")
        too_big = any(w in rec.get("reason", "") for w in ("out of memory", "timed out"))
        if rec.get("status") != "ok" and r.core == "unrolled" and args.project and too_big:
            rec.update(project_depth(args, r, say))
        say(f"[memory] {r.key}: {rec.get('status')} peak {rec.get('peak_train_mem_gib')} GiB "
            f"(paper {r.paper_mem_gib} GB) {rec.get('reason', '')}")
        done[r.key] = [{**rec, "pair": p} for p in r.pairs]
        records = [x for recs in done.values() for x in recs]
        write_paper(Path(args.out), records)  # after every row: a killed run keeps what it measured
        write_md(Path(args.out))
    return [x for recs in done.values() for x in recs]


def project_depth(args: argparse.Namespace, r: P.PaperRow, say) -> dict:
    """A row too big for this machine: measure it at two shallow depths and extrapolate linearly in depth
    (explicit-depth memory is affine in the number of layers). Reported as `projected_peak_gib`, never as a
    measurement."""
    depths = (2, 4)
    peaks = []
    for n in depths:
        say(f"[memory] {r.key}: projection point n_layer={n}")
        rec = run_one(args, child_args(args, r.key, batch=args.batch, tgt_len=args.tgt_len,
                                       mem_len=args.mem_len, extra=[f"model.n_layer={n}"]))
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
        from deqlm.config import load_config

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
    for key in ("wt103-deq-transformer-small", "ptb-deq-trellisnet"):
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
        rec = run_one(args, child_args(args, key, **kw))
        r = P.get_row(key)
        rec = {"key": key, "row": r.row, "core": r.core, "axis": axis, "x": x, "size": args.size,
               "device": args.device, **rec}
        rec.setdefault("reason", "")
        say(f"[memory sweep] {axis}={x} {key}: {rec.get('status')} peak {rec.get('peak_train_mem_gib')} GiB, "
            f"saved {rec.get('activation_gib')} GiB {rec.get('reason', '')}")
        records.append(rec)
        write_sweep(Path(args.out), records)
        write_md(Path(args.out))
    return records


# ---------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.memory_parser()
    args = p.parse_args(argv)
    if not (args.paper or args.sweep or args.row):
        p.error("choose --paper, --sweep or --row NAME")
    if args.size is None:
        args.size = "quick" if args.quick else ("full" if args.paper or args.row or args.device == "cuda"
                                               else "reduced")
    if args.quick:
        args.size = "quick"
        args.rows = args.rows or list(QUICK["rows"])
        args.inprocess = True
    args.batch = args.batch or (QUICK["batch"] if args.quick else P.PAPER_BATCH)
    args.tgt_len = args.tgt_len or (QUICK["tgt_len"] if args.quick else P.PAPER_TGT_LEN)
    args.mem_len = args.mem_len if args.mem_len is not None else (
        QUICK["mem_len"] if args.quick else P.PAPER_MEM_LEN)
    if args.row_timeout is None:
        args.row_timeout = 120.0 if args.quick else (300.0 if args.device == "cuda" else 3600.0)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.row:
            rec = run_child(args)
            print(json.dumps(rec) if args.json else _human(rec))
            return OK

        def say(msg: str) -> None:
            print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

        out = Path(args.out)
        if args.paper:
            records = run_paper(args, say)
            if args.json:
                for rec in records:
                    print(json.dumps(rec))
        if args.sweep:
            records = run_sweep(args, say)
            if args.json:
                for rec in records:
                    print(json.dumps(rec))
        write_md(out)
        say(f"[memory] wrote {out}/memory.md")
        return OK
    except (ValueError, FileNotFoundError) as exc:
        return error(str(exc), BAD_INPUT)


def _human(rec: dict) -> str:
    keys = ("key", "status", "reason", "peak_train_mem_gib", "activation_gib", "paper_mem_gib", "f_nstep",
            "b_nstep", "step_s")
    return "  ".join(f"{k}={rec.get(k)}" for k in keys if k in rec)


# ---------------------------------------------------------------------------------------------------------
# Outputs: memory.json, memory.sweep.json, memory.md, memory.paper.png, memory.sweep.png.


def pair_table(records: list[dict]) -> list[dict]:
    """One summary per pair: our and the paper's DEQ / explicit ratio, and whether we meet the paper's."""
    out = []
    for name, (deq_row, exp_row) in P.pairs().items():
        d = next((r for r in records if r.get("pair") == name and r.get("core") == "deq"), None)
        e = next((r for r in records if r.get("pair") == name and r.get("core") != "deq"), None)
        if d is None and e is None:
            continue
        paper = deq_row.paper_mem_gib / exp_row.paper_mem_gib
        ours = projected = None
        if d and e and d.get("status") == "ok":
            if e.get("status") == "ok":
                ours = d["peak_train_mem_bytes"] / e["peak_train_mem_bytes"]
            elif e.get("projected_peak_gib"):
                projected = d["peak_train_mem_gib"] / e["projected_peak_gib"]
        out.append({"pair": name, "deq_row": deq_row.row, "explicit_row": exp_row.row,
                    "deq_gib": d and d.get("peak_train_mem_gib"),
                    "explicit_gib": e and e.get("peak_train_mem_gib"),
                    "explicit_projected_gib": e and e.get("projected_peak_gib"),
                    "ratio": ours, "ratio_projected": projected, "paper_ratio": paper,
                    "meets_paper": None if ours is None else ours <= paper})
    return out


def _merge(path: Path, records: list[dict], ident) -> list[dict]:
    """This run's records replace the same items of an earlier file; the others are kept (`--rows` reruns)."""
    new = {ident(r) for r in records}
    return [r for r in C.load_json_list(path) if ident(r) not in new] + records


def write_paper(out: Path, records: list[dict]) -> None:
    from deqlm.io import atomic_write_json

    order = {r.key: i for i, r in enumerate(P.PAPER_ROWS)}
    merged = _merge(out / "memory.json", records, lambda r: (r.get("key"), r.get("pair")))
    records = sorted(merged, key=lambda r: order.get(r.get("key"), len(order)))
    atomic_write_json(out / "memory.json", records)
    ok = {}
    for r in records:
        ok.setdefault(r["key"], r)
    rows = list(ok.values())
    plt, fig, (ax,) = C.plt_figure(width=11, height=4.8)
    xs = range(len(rows))
    ours = [r.get("peak_train_mem_gib") or 0.0 for r in rows]
    proj = [0.0 if r.get("status") == "ok" else (r.get("projected_peak_gib") or 0.0) for r in rows]
    ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="deqlm (measured)", color="tab:blue")
    if any(proj):
        ax.bar([x - 0.2 for x in xs], proj, width=0.4, label="deqlm (projected, did not fit)",
               color="tab:blue", alpha=0.35, hatch="//")
    ax.bar([x + 0.2 for x in xs], [r["paper_mem_gib"] for r in rows], width=0.4, label="paper",
           color="tab:gray")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["key"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("peak training memory (GiB)")
    dev, size = (rows[0].get("device", ""), rows[0].get("size", "")) if rows else ("", "")
    ax.set_title(f"Training memory, B=15, L=150, embeddings excluded ({dev}, size {size})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.paper.png", dpi=120)
    plt.close(fig)


def write_sweep(out: Path, records: list[dict]) -> None:
    from deqlm.io import atomic_write_json

    records = _merge(out / "memory.sweep.json", records, lambda r: (r.get("axis"), r.get("key"), r.get("x")))
    records.sort(key=lambda r: (str(r.get("axis")), str(r.get("key")), r.get("x") or 0))
    atomic_write_json(out / "memory.sweep.json", records)
    plt, fig, axes = C.plt_figure(ncols=3, width=5.2, height=4.2)
    titles = {"depth": ("explicit depth (layers)", "Memory vs explicit depth"),
              "solver_steps": ("solver step cap (forward = backward)", "DEQ memory vs solver steps"),
              "seq_len": ("sequence length L (= memory length)", "Memory vs sequence length")}
    for ax, (axis, (xlabel, title)) in zip(axes, titles.items()):
        pts = [r for r in records if r.get("axis") == axis and r.get("status") == "ok"]
        for key in dict.fromkeys(r["key"] for r in pts):
            sel = sorted((r for r in pts if r["key"] == key), key=lambda r: r["x"])
            ax.plot([r["x"] for r in sel], [r["peak_train_mem_gib"] for r in sel], "o-", label=f"{key} peak")
            ax.plot([r["x"] for r in sel], [r["activation_gib"] for r in sel], "x--",
                    label=f"{key} saved for backward")
        if axis == "depth":  # the DEQ twins' level, from the solver-step sweep
            for key in ("wt103-deq-transformer-small", "ptb-deq-trellisnet"):
                level = [r["peak_train_mem_gib"] for r in records if r.get("axis") == "solver_steps"
                         and r.get("key") == key and r.get("status") == "ok"]
                if level:
                    ax.axhline(max(level), ls=":", color="k", lw=1)
                    ax.annotate(f"{key} (max over caps)", (ax.get_xlim()[0], max(level)), fontsize=7,
                                va="bottom")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GiB")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    size = records[0].get("size", "") if records else ""
    fig.suptitle(f"deqlm memory sweeps ({records[0].get('device', '') if records else ''}, size {size})")
    fig.tight_layout()
    fig.savefig(out / "memory.sweep.png", dpi=120)
    plt.close(fig)


def write_md(out: Path) -> None:
    """memory.md from whatever of memory.json / memory.sweep.json the folder holds."""
    from deqlm.io import atomic_write_text

    paper = C.load_json_list(out / "memory.json")
    sweep = C.load_json_list(out / "memory.sweep.json")
    f = C.fmt
    lines = ["# Training memory: DEQ against explicit depth", "",
             "Protocol: one training step after a warm-up step, each row in a fresh process; batch 15, "
             "sequence 150, Transformer memory 150; word embeddings excluded (the core reads random embedded "
             "inputs, the loss is the mean square of its readout: no embedding/softmax tables, gradients, "
             "optimizer state or logits). Peak = all live tensors of the measured step (parameters, "
             "gradients, Adam state, activations, solver buffers). Method: "
             + ", ".join(sorted({r.get("peak_method", "?") for r in paper + sweep
                                 if r.get("status") == "ok"}))
             + " (see docs/benchmarks.md). The paper reports GB; we report GiB.", ""]
    if paper:
        lines += ["## Pairs: DEQ / explicit memory ratio", "",
                  "| pair | DEQ GiB | explicit GiB | ours DEQ/explicit | paper DEQ/explicit "
                  "| ours <= paper |",
                  "|---|---|---|---|---|---|"]
        for p in pair_table(paper):
            ratio = f(p["ratio"], 3) if p["ratio"] is not None else (
                f"{p['ratio_projected']:.3f} (projected)" if p["ratio_projected"] else "–")
            exp = f(p["explicit_gib"], 3) if p["explicit_gib"] is not None else (
                f"{p['explicit_projected_gib']:.2f} (projected)" if p["explicit_projected_gib"] else "–")
            meets = {True: "yes", False: "no", None: "–"}[p["meets_paper"]]
            lines.append(f"| {p['pair']} | {f(p['deq_gib'], 3)} | {exp} | {ratio} | {p['paper_ratio']:.3f} "
                         f"| {meets} |")
        lines += ["", "## Rows", "",
                  "| row | core | status | peak GiB (ours) | paper GB | saved for backward GiB | "
                  "params+grads+optim GiB | solver workspace GiB | f/b cap | f/b steps | params (core) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        seen = set()
        for r in paper:
            if r["key"] in seen:
                continue
            seen.add(r["key"])
            state = sum(r.get(k) or 0 for k in ("param_bytes", "grad_bytes", "optim_bytes")) / C.GIB
            cap = f"{r.get('f_max_iter')}/{r.get('b_max_iter')}" if r.get("core") == "deq" else "–"
            steps = f"{f(r.get('f_nstep'), 0)}/{f(r.get('b_nstep'), 0)}" if r.get("core") == "deq" else "–"
            ws = (r.get("solver_workspace_bytes") or 0) / C.GIB
            status = r.get("status", "?") + (f": {r['reason']}" if r.get("reason") else "")
            if r.get("projected_peak_gib"):
                status += f" (projected {r['projected_peak_gib']:.2f} GiB: {r.get('projection', '')})"
            lines.append(f"| {r['row']} ({r['corpus']}) | {r['core']} | {status} | "
                         f"{f(r.get('peak_train_mem_gib'), 3)} | {r['paper_mem_gib']} | "
                         f"{f(r.get('activation_gib'), 3)} | {state:.3f} | {ws:.3f} | {cap} | {steps} | "
                         f"{f(r.get('params_core'))} |")
        devices = sorted({str(r.get("device")) for r in paper})
        sizes = sorted({str(r.get("size")) for r in paper})
        lines += ["", f"Device: {', '.join(devices)}; size: {', '.join(sizes)}.",
                  "Plot: memory.paper.png.", ""]
    if sweep:
        lines += ["## Sweeps", "",
                  "| axis | row | x | status | peak GiB | saved for backward GiB | f/b steps |",
                  "|---|---|---|---|---|---|---|"]
        for r in sweep:
            steps = f"{f(r.get('f_nstep'), 0)}/{f(r.get('b_nstep'), 0)}" if r.get("core") == "deq" else "–"
            lines.append(f"| {r['axis']} | {r['key']} | {r['x']} | {r.get('status')} | "
                         f"{f(r.get('peak_train_mem_gib'), 4)} | {f(r.get('activation_gib'), 4)} | {steps} |")
        lines += ["", f"Sweep size: {sweep[0].get('size')} ({sweep[0].get('device')}); "
                  "reduced = widths / 4, depth, solver caps and protocol unchanged. "
                  "Plot: memory.sweep.png.", ""]
    atomic_write_text(out / "memory.md", "\n".join(lines) + "\n")
