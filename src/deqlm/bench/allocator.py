"""`python -m deqlm.bench allocator`: training speed, minor page faults and system time with glibc's default
allocator against deqlm's tuned one (deqlm.infra.allocator), side by side in one invocation.

    python -m deqlm.bench allocator [--cases ptb-unrolled ptb-deq copy-deq] [--variants system tuned env]
        [--reps N] [--exp CONFIG --steps N --set key=value ...] [--out DIR] [--json]

Each measurement is a short `python -m deqlm.train` run in a child process (one thread, wandb off, validation
and checkpoint only at the end, a throw-away run directory). The variants of a case run back to back,
alternating, repetition after repetition, so that they share the machine's load. Variants:
  system  DEQLM_ALLOCATOR=system, no MALLOC_* variables: glibc's defaults;
  tuned   nothing set: what every deqlm entry point does by default (mallopt at start);
  env     the same settings, set by hand as MALLOC_* variables (glibc applies them at start).
Per child: tokens/s over the steps after the first quarter (first touches left out); the child's
minor page faults, system and user CPU seconds (getrusage over the whole child: start-up, data, the final
validation and checkpoint included); wall seconds; its peak RSS; the allocator mode its env record holds; its
losses.
Per case: the medians of each variant, ratios against `system`, and whether every variant's per-step losses
were identical. The PTB pair (ptb-unrolled, ptb-deq) also gets its unrolled / DEQ tokens/s ratio per
variant.
PTB cases need data/ptb (`make data-ptb`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from deqlm.infra.allocator import SWITCH, USER_VARIABLES, glibc_version
from deqlm.infra.exits import FAILED, OK, describe, error
from deqlm.infra.io import atomic_write_json
from deqlm.infra.run_folder import RunFolder

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Case:
    config: str  # experiment YAML, relative to the repository root
    steps: int  # training steps per child
    overrides: tuple[str, ...] = ()


CASES = {
    "ptb-unrolled": Case("experiments/ptb/cpu/d128/transformer_unrolled.yaml", 20),
    "ptb-deq": Case("experiments/ptb/cpu/d128/transformer_deq.yaml", 12, ("model.pretrain_steps=0",)),
    "copy-deq": Case("experiments/copy/cpu/transformer_deq.yaml", 6, ("model.pretrain_steps=0",)),
}
PAIR = ("ptb-unrolled", "ptb-deq")
ISSUE_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
             "MALLOC_TOP_PAD_": "1073741824"}
VARIANTS = {"system": {SWITCH: "system"}, "tuned": {}, "env": ISSUE_ENV}
QUIET = ("log.wandb_mode=disabled", "log.progress=false", "train.log_every=1", "train.threads=1",
         "train.eval_every=0", "train.ckpt_every=0", "train.eval_max_tokens=1")


def child_env(variant: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: the caller's, without any allocator setting, plus the variant's."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in USER_VARIABLES and k != SWITCH}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", **VARIANTS[variant])
    return env


def step_figures(events: list[dict], skip: int) -> dict:
    """tokens/s over the train events after step `skip` (each event one step: log_every=1), the peak RSS
    the trainer logged (freed memory the tuned allocator keeps counts there) and the per-step losses."""
    timed = [e for e in events if e["step"] > skip] or events
    tokens = sum(e["speed/tokens_per_s"] * e["speed/step_ms"] / 1000 for e in timed)
    seconds = sum(e["speed/step_ms"] for e in timed) / 1000
    return {"tokens_per_s": tokens / max(seconds, 1e-9), "timed_steps": len(timed),
            "peak_rss_gib": max((e.get("mem/peak_gib") or 0.0) for e in events),
            "losses": [e["train/loss"] for e in events]}


def run_child(case: Case, variant: str, runs_root: Path, timeout_s: float) -> dict:
    """One short training run in a child process; its speed, faults, CPU times and allocator mode."""
    cmd = [sys.executable, "-m", "deqlm.train", case.config, f"train.max_steps={case.steps}",
           f"train.run_dir={runs_root}", *QUIET, *case.overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(variant), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{case.config} ({variant}) exited {proc.returncode}: {tail}")
    folder = RunFolder(next(line[len("run_dir: "):] for line in proc.stdout.splitlines()
                            if line.startswith("run_dir: ")))
    events = [e for e in folder.metrics() if "train/loss" in e]
    allocator = (folder.env() or {}).get("allocator", {})
    return {"variant": variant, "allocator_mode": allocator.get("mode"),
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "sys_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime,
            "wall_s": wall, **step_figures(events, skip=max(1, case.steps // 4))}


def summarise(name: str, rows: list[dict], variants: list[str]) -> dict:
    """Medians per variant, ratios against the first variant, and whether the losses agreed exactly."""
    med = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        med[v] = {k: statistics.median(r[k] for r in mine)
                  for k in ("tokens_per_s", "minor_faults", "sys_s", "user_s", "wall_s", "peak_rss_gib")}
    ref = variants[0]
    ratios = {v: {"tokens_per_s": med[v]["tokens_per_s"] / med[ref]["tokens_per_s"],
                  "minor_faults": med[v]["minor_faults"] / max(med[ref]["minor_faults"], 1),
                  "sys_s": med[v]["sys_s"] / max(med[ref]["sys_s"], 1e-9)} for v in variants[1:]}
    identical = len({json.dumps(r["losses"]) for r in rows}) == 1
    return {"case": name, "median": med, f"ratio_vs_{ref}": ratios, "losses_identical": identical}


def run_all(cases: dict[str, Case], variants: list[str], reps: int, timeout_s: float, log) -> dict:
    """Every case, variants alternating within each repetition; rows and per-case summaries."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="deqlm-bench-allocator-") as tmp:
        for rep in range(reps):
            for name, case in cases.items():
                for variant in variants:
                    row = {"case": name, "rep": rep, **run_child(case, variant, Path(tmp), timeout_s)}
                    log(f"{name:9s} {variant:7s} rep {rep}: {row['tokens_per_s']:7.0f} tok/s, "
                        f"{row['minor_faults']:>9,} minor faults, sys {row['sys_s']:.2f} s, "
                        f"user {row['user_s']:.2f} s ({row['allocator_mode']})")
                    rows.append(row)
    summary = [summarise(n, [r for r in rows if r["case"] == n], variants) for n in cases]
    out = {"rows": rows, "summary": summary}
    by_case = {s["case"]: s for s in summary}
    if all(p in by_case for p in PAIR):
        out["ptb_unrolled_over_deq_tokens_per_s"] = {
            v: by_case[PAIR[0]]["median"][v]["tokens_per_s"] / by_case[PAIR[1]]["median"][v]["tokens_per_s"]
            for v in variants}
    return out


def table(result: dict, variants: list[str]) -> str:
    """A markdown table of the medians (ratios against the first variant in brackets)."""
    ref = variants[0]
    head = ["case", "variant", "tokens/s", "minor faults", "sys s", "user s", "peak RSS GiB",
            "losses identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result["summary"]:
        for v in variants:
            m, r = s["median"][v], s[f"ratio_vs_{ref}"].get(v)
            def rel(key, r=r):
                return f" ({r[key]:.2f}x)" if r else ""
            lines.append(f"| {s['case']} | {v} | {m['tokens_per_s']:.0f}{rel('tokens_per_s')} | "
                         f"{m['minor_faults']:,.0f}{rel('minor_faults')} | {m['sys_s']:.2f}{rel('sys_s')} | "
                         f"{m['user_s']:.2f} | {m['peak_rss_gib']:.2f} | {s['losses_identical']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deqlm.bench allocator", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="named cases")
    p.add_argument("--exp", help="measure this experiment YAML instead of the named cases")
    p.add_argument("--steps", type=int, default=0, help="training steps per child (0: the case's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--exp)")
    p.add_argument("--variants", nargs="+", default=["system", "tuned"], choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=1, help="repetitions (variants alternate within each)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    p.add_argument("--out", help="folder for allocator.json")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.exp:
        cases = {Path(args.exp).stem: Case(str(Path(args.exp).resolve()), args.steps or 10, tuple(args.set))}
    else:
        cases = {n: Case(CASES[n].config, args.steps or CASES[n].steps, (*CASES[n].overrides, *args.set))
                 for n in args.cases}
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else print
    load = os.getloadavg()
    try:
        result = run_all(cases, args.variants, args.reps, args.timeout, log)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return error(describe(exc), FAILED)
    result = {"command": "python -m deqlm.bench allocator " + " ".join(argv if argv is not None
                                                                        else sys.argv[1:]),
              "glibc": glibc_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "loadavg_1min_before_after": [load[0], os.getloadavg()[0]],
              "cases": {n: {"config": c.config, "steps": c.steps, "overrides": list(c.overrides)}
                        for n, c in cases.items()}, **result}
    if args.out:
        atomic_write_json(Path(args.out) / "allocator.json", result, indent=1)
    print(json.dumps(result) if args.json else table(result, args.variants))
    return OK
