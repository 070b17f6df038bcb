"""`python -m deqlm.demo`: a shortened run in the normal suite, the full `make demo` under the slow marker."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def check_outputs(out: Path, stdout: str) -> None:
    assert (out / "summary.md").is_file() and (out / "summary.csv").is_file()
    assert list(out.glob("*.png")), "plots"
    csv = (out / "summary.csv").read_text()
    assert "demo_transformer_deq" in csv and "demo_transformer_xl" in csv
    assert "best ppl" in stdout and "test ppl" in stdout
    runs = sorted(p.parent for p in (out.parent / "runs").rglob("metrics.jsonl"))
    assert len(runs) == 2 and all((r / "eval.json").is_file() for r in runs)


def test_short_demo_trains_both_models_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "deqlm.demo", "--steps", "6", "--out", str(out),
                           "--runs", str(tmp_path / "runs"), "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_outputs(out, proc.stdout)


@pytest.mark.slow
def test_make_demo_runs_end_to_end_within_minutes(tmp_path):
    out = tmp_path / "demo"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "deqlm.demo", "--out", str(out), "--runs",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_outputs(out, proc.stdout)
    assert time.time() - t0 < 420
