"""What the memory and speed benchmarks write: their records as JSON, markdown tables and plots.

    memory: memory.json (one object per row and pair), memory.sweep.json, memory.md, memory.paper.png,
            memory.sweep.png
    speed:  speed.json (one object per pair, both rows inside), speed.md, speed.png

The files are rewritten after every row or pair, so a run that is stopped keeps what it measured. memory.json
and memory.sweep.json are merged with what the folder already holds: a rerun of some rows (`--rows`) replaces
those and keeps the others.
"""

from __future__ import annotations

import json
from pathlib import Path

from deqlm.bench import protocol as P
from deqlm.infra.fmt import number
from deqlm.infra.io import atomic_write_json, atomic_write_text
from deqlm.infra.memory import GIB

SWEEP_TITLES = {"depth": ("unrolled depth (layers)", "Memory vs unrolled depth"),
                "solver_steps": ("solver step cap (forward = backward)", "DEQ memory vs solver steps"),
                "seq_len": ("sequence length L (= memory length)", "Memory vs sequence length")}
# the DEQ rows of the solver-step sweep; their level is drawn on the depth panel
DEQ_SWEEP_ROWS = ("wt103-deq-transformer-small", "ptb-deq-trellisnet")


def plt_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib  # only when a figure is drawn: slow to import and not needed to measure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, list(axes[0])


def load_json_list(path: Path) -> list[dict]:
    """The records of an earlier run's JSON file; [] when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return data if isinstance(data, list) else []


def _merge(path: Path, records: list[dict], ident) -> list[dict]:
    """This run's records replace the same items of an earlier file; the others are kept (`--rows` reruns)."""
    new = {ident(r) for r in records}
    return [r for r in load_json_list(path) if ident(r) not in new] + records


def _first_per_row(records: list[dict]) -> list[dict]:
    """The first record of each row, in order (a row in two pairs has a record per pair)."""
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["key"], r)
    return list(first.values())


# ---------------------------------------------------------------------------------------------------------
# Memory.


def pair_table(records: list[dict]) -> list[dict]:
    """One summary per pair: our and the paper's DEQ / unrolled ratio, and whether we meet the paper's."""
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
        out.append({"pair": name, "deq_row": deq_row.row, "unrolled_row": exp_row.row,
                    "deq_gib": d and d.get("peak_train_mem_gib"),
                    "unrolled_gib": e and e.get("peak_train_mem_gib"),
                    "unrolled_projected_gib": e and e.get("projected_peak_gib"),
                    "ratio": ours, "ratio_projected": projected, "paper_ratio": paper,
                    "meets_paper": None if ours is None else ours <= paper})
    return out


def write_memory_paper(out: Path, records: list[dict]) -> None:
    """memory.json (merged with the folder's, in table order) and memory.paper.png."""
    order = {r.key: i for i, r in enumerate(P.PAPER_ROWS)}
    merged = _merge(out / "memory.json", records, lambda r: (r.get("key"), r.get("pair")))
    records = sorted(merged, key=lambda r: order.get(r.get("key"), len(order)))
    atomic_write_json(out / "memory.json", records)
    rows = _first_per_row(records)
    plt, fig, (ax,) = plt_figure(width=11, height=4.8)
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


def write_memory_sweep(out: Path, records: list[dict]) -> None:
    """memory.sweep.json (merged with the folder's) and memory.sweep.png, one panel per axis."""
    records = _merge(out / "memory.sweep.json", records, lambda r: (r.get("axis"), r.get("key"), r.get("x")))
    records.sort(key=lambda r: (str(r.get("axis")), str(r.get("key")), r.get("x") or 0))
    atomic_write_json(out / "memory.sweep.json", records)
    plt, fig, axes = plt_figure(ncols=3, width=5.2, height=4.2)
    for ax, (axis, (xlabel, title)) in zip(axes, SWEEP_TITLES.items()):
        _sweep_panel(ax, axis, records)
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


def _sweep_panel(ax, axis: str, records: list[dict]) -> None:
    """Peak and saved-for-backward bytes of each row along `axis`; the depth panel also draws each DEQ row's
    level (its largest peak over the solver-step sweep), the line unrolled depth crosses."""
    pts = [r for r in records if r.get("axis") == axis and r.get("status") == "ok"]
    for key in dict.fromkeys(r["key"] for r in pts):
        sel = sorted((r for r in pts if r["key"] == key), key=lambda r: r["x"])
        ax.plot([r["x"] for r in sel], [r["peak_train_mem_gib"] for r in sel], "o-", label=f"{key} peak")
        ax.plot([r["x"] for r in sel], [r["activation_gib"] for r in sel], "x--",
                label=f"{key} saved for backward")
    if axis != "depth":
        return
    for key in DEQ_SWEEP_ROWS:
        level = [r["peak_train_mem_gib"] for r in records if r.get("axis") == "solver_steps"
                 and r.get("key") == key and r.get("status") == "ok"]
        if level:
            ax.axhline(max(level), ls=":", color="k", lw=1)
            ax.annotate(f"{key} (max over caps)", (ax.get_xlim()[0], max(level)), fontsize=7, va="bottom")


def write_memory_md(out: Path) -> None:
    """memory.md from whatever of memory.json / memory.sweep.json the folder holds."""
    paper = load_json_list(out / "memory.json")
    sweep = load_json_list(out / "memory.sweep.json")
    methods = sorted({r.get("peak_method", "?") for r in paper + sweep if r.get("status") == "ok"})
    lines = ["# Training memory: DEQ against unrolled depth", "",
             "Protocol: one training step after a priming step, each row in a fresh process; batch 15, "
             "sequence 150, Transformer memory 150; word embeddings excluded (the core reads random embedded "
             "inputs, the loss is the mean square of its readout: no embedding/softmax tables, gradients, "
             "optimizer state or logits). Peak = all live tensors of the measured step (parameters, "
             "gradients, Adam state, activations, solver buffers). Method: " + ", ".join(methods)
             + " (see docs/benchmarks.md). The paper reports GB; we report GiB.", ""]
    if paper:
        lines += _memory_pair_lines(paper) + _memory_row_lines(paper)
    if sweep:
        lines += _memory_sweep_lines(sweep)
    atomic_write_text(out / "memory.md", "\n".join(lines) + "\n")


def _gib(x, digits: int = 3) -> str:
    return number(x, digits, fixed=True)


def _memory_pair_lines(paper: list[dict]) -> list[str]:
    lines = ["## Pairs: DEQ / unrolled memory ratio", "",
             "| pair | DEQ GiB | unrolled GiB | ours DEQ/unrolled | paper DEQ/unrolled | ours <= paper |",
             "|---|---|---|---|---|---|"]
    for p in pair_table(paper):
        ratio = _gib(p["ratio"]) if p["ratio"] is not None else (
            f"{p['ratio_projected']:.3f} (projected)" if p["ratio_projected"] else number(None))
        exp = _gib(p["unrolled_gib"]) if p["unrolled_gib"] is not None else (
            f"{p['unrolled_projected_gib']:.2f} (projected)" if p["unrolled_projected_gib"] else number(None))
        lines.append(f"| {p['pair']} | {_gib(p['deq_gib'])} | {exp} | {ratio} | {p['paper_ratio']:.3f} "
                     f"| {number(p['meets_paper'])} |")
    return lines


def _memory_row_lines(paper: list[dict]) -> list[str]:
    lines = ["", "## Rows", "",
             "| row | core | status | peak GiB (ours) | paper GB | saved for backward GiB | "
             "params+grads+optim GiB | solver workspace GiB | f/b cap | f/b steps | params (core) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _first_per_row(paper):
        state = sum(r.get(k) or 0 for k in ("param_bytes", "grad_bytes", "optim_bytes")) / GIB
        ws = (r.get("solver_workspace_bytes") or 0) / GIB
        status = r.get("status", "?") + (f": {r['reason']}" if r.get("reason") else "")
        if r.get("projected_peak_gib"):
            status += f" (projected {r['projected_peak_gib']:.2f} GiB: {r.get('projection', '')})"
        lines.append(f"| {r['row']} ({r['corpus']}) | {r['core']} | {status} | "
                     f"{_gib(r.get('peak_train_mem_gib'))} | {r['paper_mem_gib']} | "
                     f"{_gib(r.get('activation_gib'))} | {state:.3f} | {ws:.3f} | {_solver_cap(r)} | "
                     f"{_solver_steps(r)} | {number(r.get('params_core'))} |")
    devices = sorted({str(r.get("device")) for r in paper})
    sizes = sorted({str(r.get("size")) for r in paper})
    return lines + ["", f"Device: {', '.join(devices)}; size: {', '.join(sizes)}.", "Plot: memory.paper.png.",
                    ""]


def _solver_cap(r: dict) -> str:
    return f"{r.get('f_max_iter')}/{r.get('b_max_iter')}" if r.get("core") == "deq" else number(None)


def _solver_steps(r: dict, digits: int = 0) -> str:
    if r.get("core") != "deq":
        return number(None)
    return f"{number(r.get('f_nstep'), digits, fixed=True)}/{number(r.get('b_nstep'), digits, fixed=True)}"


def _memory_sweep_lines(sweep: list[dict]) -> list[str]:
    lines = ["## Sweeps", "", "| axis | row | x | status | peak GiB | saved for backward GiB | f/b steps |",
             "|---|---|---|---|---|---|---|"]
    for r in sweep:
        lines.append(f"| {r['axis']} | {r['key']} | {r['x']} | {r.get('status')} | "
                     f"{_gib(r.get('peak_train_mem_gib'), 4)} | {_gib(r.get('activation_gib'), 4)} | "
                     f"{_solver_steps(r)} |")
    size = f"Sweep size: {sweep[0].get('size')} ({sweep[0].get('device')})"
    return lines + ["", f"{size}; reduced = widths / 4, depth, solver caps and protocol unchanged. "
                    "Plot: memory.sweep.png.", ""]


# ---------------------------------------------------------------------------------------------------------
# Speed.


def infer_step_ms(r: dict) -> float | None:
    """Inference time per forward solver step, from a record's `infer_ms` and `infer_f_nstep`: eval mode like
    `f_eval_ms`, so the two compare directly (the training forward also applies dropout masks)."""
    n = r.get("infer_f_nstep")
    return round(r["infer_ms"] / n, 3) if n and r.get("infer_ms") is not None else None


def write_speed(out: Path, records: list[dict]) -> None:
    """speed.json, speed.md and (when a pair measured) speed.png for this run's pairs."""
    atomic_write_json(out / "speed.json", records)
    lines = ["# Speed: DEQ against its unrolled baseline", "",
             "Protocol: batch 15, sequence 150, Transformer memory 150, the core on random embedded inputs "
             "(no embedding / softmax, which costs both models the same). Median over the timed steps after "
             "untimed ones; each row in a fresh process. Solver limits are the rows' training limits; "
             "tol `cap` = tolerance 0, every solve runs to its limit (worst case).", "",
             "| pair | size | DEQ/unrolled train | paper | DEQ/unrolled infer | paper | f/b cap "
             "| f/b steps | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ratios = [number(r[k], 2, fixed=True)
                  for k in ("train_ratio", "paper_train_ratio", "infer_ratio", "paper_infer_ratio")]
        steps = f"{number(r['f_nstep'], 1, fixed=True)}/{number(r['b_nstep'], 1, fixed=True)}"
        lines.append(f"| {r['pair']} | {r['size']} | {' | '.join(ratios)} | "
                     f"{r['f_max_iter']}/{r['b_max_iter']} | {steps} | {r['status']} {r['reason']} |")
    lines += _speed_model_lines(records)
    devices = sorted({str(r["device"]) for r in records})
    lines += ["", f"Device: {', '.join(devices)}. Sizes: full = the paper's widths; reduced = widths / 4 "
              "(depth, solver limits and protocol unchanged).", ""]
    atomic_write_text(out / "speed.md", "\n".join(lines) + "\n")
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        _speed_plot(out / "speed.png", ok)


# (record key, decimals) of the per-model columns, in table order
SPEED_COLUMNS = (("train_step_ms", 1), ("fwd_ms", 1), ("bwd_ms", 1), ("fwd_share", 2), ("infer_ms", 1),
                 ("train_tok_s", 0), ("infer_tok_s", 0), ("ms_per_f_step", 2), ("ms_per_b_step", 2),
                 ("ms_per_infer_step", 2), ("f_eval_ms", 2))


def _speed_model_lines(records: list[dict]) -> list[str]:
    lines = ["", "## Per model", "",
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
            r = {**r, "ms_per_infer_step": infer_step_ms(r)}
            cells = [number(r.get(k), d, fixed=True) for k, d in SPEED_COLUMNS]
            lines.append(f"| {r['row']} | {r['core']} | {' | '.join(cells)} |")
    return lines


def _speed_plot(path: Path, ok: list[dict]) -> None:
    plt, fig, (ax,) = plt_figure(width=8, height=4.4)
    xs = range(len(ok))
    ax.bar([x - 0.3 for x in xs], [r["train_ratio"] for r in ok], width=0.2, label="train (ours)")
    ax.bar([x - 0.1 for x in xs], [r["paper_train_ratio"] or 0 for r in ok], width=0.2, label="train (paper)")
    ax.bar([x + 0.1 for x in xs], [r["infer_ratio"] for r in ok], width=0.2, label="inference (ours)")
    ax.bar([x + 0.3 for x in xs], [r["paper_infer_ratio"] or 0 for r in ok], width=0.2,
           label="inference (paper)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["pair"] for r in ok], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("DEQ time / unrolled time (x)")
    ax.set_title(f"DEQ / unrolled step time ({ok[0]['device']}, size {ok[0]['size']}, tol {ok[0]['tol']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
