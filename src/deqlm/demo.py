"""`python -m deqlm.demo`: a DEQ-Transformer and its unrolled baseline on the embedded corpus, then the table.

Offline, CPU-sized (a few minutes on 2 cores): both runs train on the same token budget
(experiments/demo/*.yaml); each run is its own `python -m deqlm.train` process so that peak memory is
measured per model; both are evaluated on the whole valid/test splits (`deqlm.eval`), and the comparison
report (perplexity, best possible perplexity = exp(entropy rate of the synthetic corpus), peak memory, bytes
saved for backward, tokens/s, solver steps) is printed and written with plots to `--out` (results/demo/).

    python -m deqlm.demo [--steps N] [--out DIR] [--runs DIR] [--threads N]

`--steps` shortens both runs (CI uses a handful). Run directories go under results/runs/ (git-ignored, the
trainer's default root) unless --runs says otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from deqlm.eval import cli as eval_cli  # loads torch only once it evaluates: `--help` answers without it
from deqlm.eval.report import write_report
from deqlm.infra.allocator import tune_allocator
from deqlm.infra.exits import FAILED, OK, error
from deqlm.infra.fmt import number

EXPERIMENTS = ("experiments/demo/transformer_deq.yaml", "experiments/demo/transformer_xl.yaml")
TITLE = "Demo: DEQ-Transformer vs unrolled Transformer-XL on the embedded synthetic corpus"


def _repo_root() -> Path:
    """The checkout holding experiments/ (the package is installed editable from it), else the cwd."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "experiments" / "demo").is_dir():
            return parent
    return Path.cwd()


def run_training(config: Path, overrides: list[str], log) -> Path:
    """Train one experiment in a child process; returns its run directory (parsed from `run_dir: PATH`)."""
    cmd = [sys.executable, "-m", "deqlm.train", str(config), *overrides]
    log(f"$ {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    run_dir = None
    assert proc.stdout is not None
    for line in proc.stdout:
        log("  " + line.rstrip())
        if line.startswith("run_dir: "):
            run_dir = Path(line[len("run_dir: "):].strip())
    if proc.wait() != 0 or run_dir is None:
        raise RuntimeError(f"training {config} failed (exit code {proc.returncode})")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqlm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="steps per model (0: the configs')")
    parser.add_argument("--out", default="results/demo", help="report folder (summary.md/csv, plots)")
    parser.add_argument("--runs", default="results/runs", help="root of the run directories")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: as configured)")
    args = parser.parse_args(argv)

    root = _repo_root()
    out = Path(args.out)
    runs_root = Path(args.runs)
    overrides = [f"train.run_dir={runs_root}", "log.progress=false"]  # wandb: only when WANDB_MODE asks
    if args.steps > 0:
        # a shortened demo keeps the schedule's shape: pretraining takes the same fraction of the steps
        overrides += [f"train.max_steps={args.steps}", f"train.log_every={max(1, args.steps // 10)}",
                      f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}"]
    if args.threads is not None:
        overrides.append(f"train.threads={args.threads}")

    def log(text: str) -> None:
        print(text, flush=True)

    t0 = time.perf_counter()
    run_dirs = []
    for exp in EXPERIMENTS:
        extra = []
        if args.steps > 0 and exp.endswith("transformer_deq.yaml"):
            extra = [f"model.pretrain_steps={max(1, args.steps // 4)}"]
        try:
            run_dirs.append(run_training(root / exp, overrides + extra, log))
        except RuntimeError as exc:  # the child printed its own error line above
            return error(str(exc), FAILED)
    t_train = time.perf_counter() - t0

    import torch  # only after training: the demo's own process needs torch for evaluation alone

    # evaluate with the runs' thread count: more threads than cores makes OpenMP spin against itself
    torch.set_num_threads(args.threads if args.threads is not None else min(2, os.cpu_count() or 1))
    for run_dir in run_dirs:  # as `python -m deqlm.eval RUN_DIR split=valid,test force=true` does
        code = eval_cli.main([str(run_dir), "split=valid,test", "force=true"])
        if code != OK:
            return code
    rows = write_report(run_dirs, out, TITLE, log=log)
    summary = (out / "summary.md").read_text()
    print()
    print(summary)
    print(_compact_table(rows))
    total = time.perf_counter() - t0
    print(f"demo: training {t_train:.0f}s, total {total:.0f}s; report in {out}/ (summary.md/csv, plots)")
    return OK


def _compact_table(rows: list[dict]) -> str:
    """The headline comparison in a few columns (the full table is summary.md)."""
    head = ["model", "params", "test ppl", "best ppl", "peak RSS GiB", "act. MiB", "tok/s", "f_nstep"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        act = None if r.get("activation_bytes") is None else r["activation_bytes"] / 2**20
        lines.append("| " + " | ".join([
            f"{r['experiment']} ({r['core']})", number(r.get("params_total")), number(r.get("test_ppl")),
            number(r.get("best_possible_ppl")), number(r.get("peak_train_mem_gib"), 3), number(act, 3),
            number(r.get("tokens_per_s"), 5), number(r.get("f_nstep_mean"), 3)]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    tune_allocator()
    raise SystemExit(main())
