"""Figures of the comparison report: validation curves, peak memory, solver statistics over training.

Every figure is titled, has labelled axes with units and a legend naming each run once; a run keeps one
colour (its experiment's), marker (its seed's) and label across figures, DEQ solid and unrolled dashed or
hatched, and a DEQ that stopped short of its fixed point says so in its label.
Each function returns False, writing nothing, when no run has the data it plots.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from pathlib import Path

from deqlm.eval.convergence import EQUILIBRIUM_MAX_REL_RES, NOT_AT_EQUILIBRIUM
from deqlm.infra.fmt import as_number
from deqlm.infra.io import atomic_write_bytes
from deqlm.infra.run_folder import EVAL


def log_series(events: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of the training log's events that carry both keys as finite numbers."""
    xs, ys = [], []
    for e in events:
        xv, yv = as_number(e.get(x)), as_number(e.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def _legend_below_and_save(fig, ax, ncol: int, path: Path) -> None:
    """One figure legend (from `ax`'s runs, each label once) under the axis labels, then write and close the
    figure."""
    import matplotlib.pyplot as plt

    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(list(unique.values()), list(unique), loc="upper center", ncol=min(ncol, len(unique)),
               bbox_to_anchor=(0.5, -0.01))
    _save(fig, path)
    plt.close(fig)


def log_values(events: list[dict], key: str) -> list[float]:
    return [v for v in (as_number(e.get(key)) for e in events) if v is not None]


MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # one per seed of an experiment


def run_label(row: dict, seeds_of_experiment: int) -> str:
    """A run's legend entry, written once: its experiment, its seed when the experiment has several, its core,
    and for a DEQ that stopped short of its fixed point, that it did."""
    label = row["experiment"] + (f" seed {row['seed']}" if seeds_of_experiment > 1 else "")
    if row["core"] != "deq":
        return label + " (unrolled)"
    short = row.get("equilibrium") == NOT_AT_EQUILIBRIUM
    return label + (f" (DEQ, {NOT_AT_EQUILIBRIUM})" if short else " (DEQ)")


def run_styles(runs: list[dict]) -> dict[str, dict]:
    """One colour per experiment and one marker per seed, solid for DEQ and dashed for unrolled: every run
    can be told apart in every figure, and a run keeps its colour, marker and label across figures."""
    import matplotlib.pyplot as plt

    experiments = sorted({r["row"]["experiment"] for r in runs})
    paired = plt.get_cmap("tab20").colors  # dark and light shades alternate: all dark ones first
    colours = paired[0::2] + paired[1::2]
    seeds: dict[str, list] = defaultdict(list)
    for r in runs:
        seeds[r["row"]["experiment"]].append(r["row"]["seed"])
    style = {}
    for r in runs:
        row = r["row"]
        own = sorted(set(seeds[row["experiment"]]), key=str)
        style[row["run"]] = {
            "color": colours[experiments.index(row["experiment"]) % len(colours)],
            "linestyle": "-" if row["core"] == "deq" else "--",
            "marker": MARKERS[own.index(row["seed"]) % len(MARKERS)],
            "label": run_label(row, len(own)),
        }
    return style


def label_log_axis(axis) -> None:
    """Plain numbers on a log axis at 1, 2 and 5 of every decade, or at ten points a decade when the data span
    less than two decades, so a reader can place a curve without the CSV (matplotlib's default labels only
    the powers of ten). Call it after the data are plotted."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    short = lo > 0 and hi / lo < 100
    subs = (1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0) if short else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _time_axis(runs: list[dict]) -> tuple[float, str]:
    longest = max((max(log_values(r["events"], "time/elapsed_s") or [0.0]) for r in runs), default=0.0)
    if longest >= 2 * 3600:
        return 3600.0, "hours"
    return (60.0, "minutes") if longest >= 120 else (1.0, "seconds")


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(runs: list[dict], path: Path, title: str, style: dict[str, dict]) -> bool:
    """Validation perplexity (loss for copy memory) vs optimizer step and vs wall-clock time."""
    import matplotlib.pyplot as plt

    copy_task = all(r["row"]["corpus"] == "copy" for r in runs)
    key, ylabel = (
        ("valid/loss", "validation loss (CE per position, nats, log scale)")
        if copy_task
        else ("valid/ppl", "validation perplexity (log scale)")
    )
    if not any(log_values(r["events"], key) for r in runs):
        return False
    scale, unit = _time_axis(runs)
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for r in runs:
        st = style[r["row"]["run"]]
        xs, ys = log_series(r["events"], key)
        ax_s.plot(xs, ys, markersize=3, **st)
        ts, ys_t = log_series(r["events"], key, x="time/elapsed_s")
        ax_t.plot([t / scale for t in ts], ys_t, markersize=3, **st)
    # log scale when possible: early perplexities are orders of magnitude above the final ones
    yscale = "log" if all(v > 0 for r in runs for v in log_values(r["events"], key)) else "linear"
    if yscale == "linear":
        ylabel = ylabel.replace(" (log scale)", "")
    ax_s.set(
        xlabel="training step (optimizer updates)", ylabel=ylabel, yscale=yscale, title="vs training step"
    )
    ax_t.set(xlabel=f"wall-clock training time ({unit})", yscale=yscale, title="vs wall-clock time")
    for ax in (ax_s, ax_t):
        ax.grid(True, which="both", alpha=0.3)
        if yscale == "log":
            label_log_axis(ax.yaxis)
    what = "Validation loss" if copy_task else "Validation perplexity"
    fig.suptitle(f"{title}: {what} during training (training-log figures, not {EVAL})")
    _legend_below_and_save(fig, ax_s, 3, path)
    return True


def plot_memory(runs: list[dict], path: Path, title: str, style: dict[str, dict]) -> bool:
    """Peak training memory per run (horizontal bars, value printed on each)."""
    import matplotlib.pyplot as plt

    have = [r for r in runs if r["row"]["peak_train_mem_gib"] is not None]
    if not have:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(have) + 1.6))
    for i, r in enumerate(have):
        st, gib = style[r["row"]["run"]], r["row"]["peak_train_mem_gib"]
        ax.barh(i, gib, color=st["color"], hatch="" if r["row"]["core"] == "deq" else "//", edgecolor="black")
        ax.text(gib, i, f" {gib:.3g} GiB", va="center")
    ax.set_yticks(range(len(have)), [style[r["row"]["run"]]["label"] for r in have])
    ax.invert_yaxis()
    kinds = sorted({r["row"]["peak_mem_kind"] for r in have if r["row"]["peak_mem_kind"]})
    ax.set_xlabel("peak training memory (GiB)" + (f" [{', '.join(kinds)}]" if kinds else ""))
    ax.set_xlim(0, max(r["row"]["peak_train_mem_gib"] for r in have) * 1.25)
    ax.set_title(f"{title}: peak training memory per run (hatched: unrolled)")
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_solver(runs: list[dict], path: Path, title: str, style: dict[str, dict]) -> bool:
    """Solver steps and relative residual over training; forward solid, backward (adjoint) dotted."""
    import matplotlib.pyplot as plt

    have = [r for r in runs if log_values(r["events"], "solver/f_nstep")]
    if not have:
        return False
    fig, (ax_n, ax_r) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in have:
        st = dict(style[r["row"]["run"]])
        label = st.pop("label")
        st.pop("linestyle")
        for ax, fkey, bkey in (
            (ax_n, "solver/f_nstep", "solver/b_nstep"),
            (ax_r, "solver/f_rel_res", "solver/b_rel_res"),
        ):
            ax.plot(*log_series(r["events"], fkey), linestyle="-", label=f"{label} forward", markevery=0.1,
                    markersize=4, **st)
            if log_values(r["events"], bkey):
                ax.plot(*log_series(r["events"], bkey), linestyle=":", label=f"{label} backward",
                        markevery=0.1, markersize=4, **st)
    ax_r.axhline(EQUILIBRIUM_MAX_REL_RES, color="black", linewidth=1, linestyle="-.",
                 label=f"equilibrium threshold ({EQUILIBRIUM_MAX_REL_RES})")
    ax_n.set(
        xlabel="training step (optimizer updates)",
        ylabel="solver iterations per solve",
        title="solver steps",
    )
    ax_r.set(
        xlabel="training step (optimizer updates)",
        ylabel="relative residual ||f(z)-z||/||f(z)|| (log scale)",
        yscale="log",
        title="residual at exit",
    )
    for ax in (ax_n, ax_r):
        ax.grid(True, which="both", alpha=0.3)
    label_log_axis(ax_r.yaxis)
    ax_r.legend(handles=ax_r.get_lines()[-1:], fontsize=8, loc="upper right")
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle(f"{title}: equilibrium solver over training (DEQ mode only)")
    _legend_below_and_save(fig, ax_n, 2, path)
    return True


def depth_families(runs: list[dict]) -> dict[str, list[dict]]:
    """Pairs whose unrolled runs differ in depth (a depth sweep), each with its runs (DEQ ones included)."""
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        if r["row"]["pair"]:
            by_pair[r["row"]["pair"]].append(r)
    return {
        pair: members
        for pair, members in sorted(by_pair.items())
        if len({r["cfg"].model.n_layer for r in members if r["row"]["core"] == "unrolled"}) >= 2
    }


def plot_tradeoff(runs: list[dict], path: Path, title: str, style: dict[str, dict]) -> bool:
    """The paper's claim in one figure: test ppl against the memory the model's own tensors take (activations
    saved for backward + parameters, gradients, optimizer state), one point per run of a depth sweep. Unrolled
    runs are joined in order of depth; the DEQ is one star."""
    import matplotlib.pyplot as plt

    def point(r: dict) -> tuple[float, float] | None:
        x, y = as_number(r["row"]["model_mem_mib"]), as_number(r["row"]["test_ppl"])
        return None if x is None or y is None else (x, y)

    families = {p: [r for r in rs if point(r)] for p, rs in depth_families(runs).items()}
    families = {p: rs for p, rs in families.items() if len(rs) >= 2}
    if not families:
        return False
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.8), squeeze=False)
    for ax, (pair, members) in zip(axes[0], families.items()):
        unrolled = [r for r in members if r["row"]["core"] == "unrolled"]
        unrolled.sort(key=lambda r: r["cfg"].model.n_layer)
        xs, ys = zip(*(point(r) for r in unrolled)) if unrolled else ((), ())
        ax.plot(xs, ys, marker="o", color="tab:blue", label="unrolled, by depth")
        for r, x, y in zip(unrolled, xs, ys):
            ax.annotate(f" {r['cfg'].model.n_layer} levels", (x, y), fontsize=8)
        for r in (r for r in members if r["row"]["core"] == "deq"):
            x, y = point(r)
            ax.plot([x], [y], marker="*", markersize=14, linestyle="", color="tab:red",
                    label=style[r["row"]["run"]]["label"])
        ax.set(xlabel="model memory in training (MiB): activations saved for backward + weights, gradients, "
                      "optimizer state", ylabel="test perplexity (whole split)", title=pair)
        ax.xaxis.label.set_size(8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy against memory (one point per run)")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_solver_caps(runs: list[dict], path: Path, title: str, style: dict[str, dict]) -> bool:
    """The DEQ's compute knob: test ppl of one checkpoint against the forward solver cap at inference, the
    unrolled baseline's test ppl as a horizontal line and the training cap as a vertical one."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    deqs = [r for r in runs if (r.get("caps") or {}).get("points")]
    if not deqs:
        return False
    by_run = {r["row"]["run"]: r for r in runs}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in deqs:
        st = style[r["row"]["run"]]
        pts = sorted((p["cap"], p["ppl"]) for p in r["caps"]["points"] if as_number(p.get("ppl")) is not None)
        ax.plot(*zip(*pts), marker=st["marker"], color=st["color"], label=st["label"])
        ax.axvline(r["cfg"].deq.f_max_iter, color=st["color"], linestyle=":", alpha=0.6)
        baseline = by_run.get(r["row"]["paired_with"] or "")
        if baseline is not None and as_number(baseline["row"]["test_ppl"]) is not None:
            ax.axhline(baseline["row"]["test_ppl"], color=st["color"], linestyle="--",
                       label=f"{style[baseline['row']['run']]['label']}, its baseline")
    ax.set_xscale("log", base=2)
    caps = sorted({p["cap"] for r in deqs for p in r["caps"]["points"]})
    ax.set_xticks(caps, [str(c) for c in caps])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="forward solver cap at inference (steps; dotted: the training cap)",
           ylabel="test perplexity (whole split)", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    label_log_axis(ax.yaxis)
    ax.set_title(f"{title}: one set of DEQ weights, more solver steps at inference")
    _legend_below_and_save(fig, ax, 2, path)
    return True


def width_family(experiment: str) -> str:
    """An experiment's name without its width: files of one study at several widths are named `..._d<width>`
    (experiments/ptb/gpu/), where the CPU studies reuse one name at every width."""
    return re.sub(r"_d\d+", "", experiment)


def plot_gap_by_width(means: list[dict], path: Path, title: str) -> bool:
    """Does parity depend on width? The DEQ's test gap to its baseline against the model width, one line per
    DEQ and baseline family and token budget (`pairing.seed_means` rows): the seeds' mean, their range as an
    error bar. Drawn when some family was paired at two widths or more."""
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[dict]] = defaultdict(list)
    for m in means:
        if as_number(m.get("gap_pct_mean")) is not None and m.get("width") is not None:
            family = width_family(m["deq_experiment"]), width_family(m["unrolled_experiment"])
            key = (*family, m["train_tokens"])
            lines[key].append(m)
    families = {k for k, ms in lines.items() if len({m["width"] for m in ms}) >= 2}
    if not families:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8))
    drawn = sorted(k for k in lines if any(k[:2] == f[:2] for f in families))
    for i, key in enumerate(drawn):
        ms = sorted(lines[key], key=lambda m: m["width"])
        mean = [m["gap_pct_mean"] for m in ms]
        err = [[m["gap_pct_mean"] - m["gap_pct_min"] for m in ms],
               [m["gap_pct_max"] - m["gap_pct_mean"] for m in ms]]
        seeds = max(m["n_seeds"] for m in ms)
        ax.errorbar([m["width"] for m in ms], mean, yerr=err, marker=MARKERS[i % len(MARKERS)], capsize=3,
                    color=f"C{i % 10}", label=f"{key[0]} vs {key[1]}, {key[2] / 1e6:g}M tokens "
                                          f"(up to {seeds} seed{'s' if seeds > 1 else ''})")
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set(xlabel="model width d_model", ylabel="test gap, % of the unrolled baseline (DEQ worse > 0)",
           title=f"{title}: DEQ - unrolled gap against width, by token budget")
    ax.set_xticks(sorted({m["width"] for k in drawn for m in lines[k]}))
    ax.grid(True, alpha=0.3)
    _legend_below_and_save(fig, ax, 1, path)
    return True


def plot_gap_by_residual(pairs: list[dict], path: Path, title: str) -> bool:
    """Does parity follow convergence? Each DEQ-Transformer pair's test gap against its DEQ's mean forward
    relative residual at evaluation, the equilibrium threshold as a vertical line. One colour per DEQ
    experiment and width (the variants differ by far more than convergence explains), a cross for a DEQ
    not at equilibrium."""
    import matplotlib.pyplot as plt

    have = [p for p in pairs if p.get("arch") == "transformer" and p.get("corpus") != "copy"
            and not p["notes"] and as_number(p.get("gap_pct")) is not None
            and as_number(p.get("deq_eval_f_rel_res")) is not None]  # same-budget language-model pairs
    if len(have) < 2:
        return False
    groups = sorted({(p["deq_experiment"], p["width"]) for p in have}, key=lambda g: (g[1], g[0]))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    labelled: set[str] = set()
    for p in have:
        group = (p["deq_experiment"], p["width"])
        at = p["deq_equilibrium"] != NOT_AT_EQUILIBRIUM
        label = f"{group[0]}, d_model {group[1]}" + ("" if at else f" ({NOT_AT_EQUILIBRIUM})")
        ax.plot([p["deq_eval_f_rel_res"]], [p["gap_pct"]], linestyle="", marker="o" if at else "X",
                markersize=8, color=f"C{groups.index(group) % 10}",
                label=None if (label in labelled) else label)
        labelled.add(label)
    ax.axvline(EQUILIBRIUM_MAX_REL_RES, color="black", linewidth=1, linestyle="-.")
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xscale("log")
    label_log_axis(ax.xaxis)
    ax.set(xlabel="DEQ's mean forward relative residual at evaluation (log scale; dash-dot: 0.05)",
           ylabel="test gap, % of the unrolled baseline (DEQ worse > 0)",
           title=f"{title}: gap against how close each DEQ got to its fixed point")
    ax.grid(True, which="both", alpha=0.3)
    _legend_below_and_save(fig, ax, 2, path)
    return True
