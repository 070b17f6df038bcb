"""One row per process: the memory and speed benchmarks measure every configuration in a fresh
`python -m deqlm.bench SUBCOMMAND --row KEY ... --json` child, with a timeout, that answers with one JSON
line.

A fresh process is what makes a peak-memory figure belong to one row (nothing earlier stays resident or
cached) and keeps one row's crash or out-of-memory from ending the run: the child reports it as a skipped
record and the parent goes on to the next row. `--inprocess` (CI) calls the same child code directly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from deqlm.bench.protocol import REPO_ROOT, PaperRow, get_row
from deqlm.infra.exits import describe
from deqlm.infra.runtime import describe_device, pick_device, set_threads

# measure(row, device, args) -> the row's record; args carries the protocol and the subcommand's own options
Measure = Callable[[PaperRow, torch.device, argparse.Namespace], dict]


def run_fresh(subcommand: str, args: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run `python -m deqlm.bench SUBCOMMAND ARGS --json` in a fresh process; its last JSON line, or
    {'status': 'skipped', 'reason': ...} on timeout, crash or missing output (never raises)."""
    cmd = [sys.executable, "-m", "deqlm.bench", subcommand, *args, "--json"]
    child_env = dict(os.environ if env is None else env)
    src = str(REPO_ROOT / "src")
    old = child_env.get("PYTHONPATH")
    child_env["PYTHONPATH"] = src + (os.pathsep + old if old else "")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"timed out after {timeout_s:.0f} s (fresh process killed)"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rec.setdefault("wall_s", round(wall, 2))
            return rec
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "skipped", "reason": f"child exited {proc.returncode}: {tail}"}


def run_child(args: argparse.Namespace, measure: Measure) -> dict:
    """`--row`: measure in this process; a missing experiment, an out-of-memory or a crash comes back as a
    skipped record naming it (the parent keeps going)."""
    row = get_row(args.row)
    base = {"key": row.key, "row": row.row, "core": row.core, "corpus": row.corpus,
            "paper_mem_gib": row.paper_mem_gib, "size": args.size, "device": args.device}
    try:
        device = pick_device(args.device)
        base["device"] = describe_device(device)
        set_threads(args.threads)
        torch.manual_seed(0)
        return measure(row, device, args)
    except FileNotFoundError as exc:
        return {**base, "status": "skipped", "reason": str(exc)}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {**base, "status": "skipped", "reason": f"out of memory on {args.device}: {describe(exc)}"}
    except RuntimeError as exc:
        msg = describe(exc)
        if "alloc" in msg.lower() or "out of memory" in msg.lower():
            return {**base, "status": "skipped", "reason": f"out of memory on {args.device}: {msg}"}
        return {**base, "status": "skipped", "reason": f"failed: {type(exc).__name__}: {msg}"}


def child_argv(args: argparse.Namespace, key: str, *, batch: int, tgt_len: int, mem_len: int,
               extra: list[str] | tuple[str, ...] = (), own: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The child's command line: row, protocol and `--set` overrides, plus the subcommand's `own` options."""
    out = ["--row", key, "--device", args.device, "--size", args.size, "--batch", str(batch),
           "--tgt-len", str(tgt_len), "--mem-len", str(mem_len), "--tol", args.tol,
           *(["--threads", str(args.threads)] if args.threads is not None else []), *own]
    for item in extra:
        out += ["--set", item]
    return out


def run_row(subcommand: str, args: argparse.Namespace, argv: list[str],
            parse: Callable[[list[str]], argparse.Namespace], measure: Measure) -> dict:
    """One row: a fresh `python -m deqlm.bench SUBCOMMAND` process, or (`--inprocess`, CI) a direct call."""
    if not args.inprocess:
        return run_fresh(subcommand, argv, args.row_timeout)
    return run_child(parse([*argv, "--json", "--inprocess"]), measure)


def answer_row(args: argparse.Namespace, measure: Measure, human_keys: tuple[str, ...] = ()) -> None:
    """The child's answer on stdout: one JSON line (`--json`), or the record's `human_keys` on one line."""
    rec = run_child(args, measure)
    if args.json:
        print(json.dumps(rec))
    else:
        print("  ".join(f"{k}={rec.get(k)}" for k in (human_keys or rec) if k in rec))
