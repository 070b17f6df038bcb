"""scripts/gpu_width_study.sh at tiny size on the CPU: every run of every row trains, is evaluated, and the
report pairs each DEQ with the baselines of its width."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_width_study.sh"
STUDY = {p.stem: load_config(p, env={}) for p in sorted((ROOT / "experiments/ptb/gpu").glob("*.yaml"))
         if not p.stem.endswith("base")}  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "data/ptb/ptb.train.txt").is_file(), reason="needs data/ptb (make data-ptb)")
def test_the_width_study_runs_every_row_and_pairs_each_deq_with_its_baselines(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(SCRIPT), str(tmp_path / "out"), "--tiny"], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = tmp_path / "out"
    assert json.loads((res / "env.json").read_text())["torch"]

    rows = list(csv.DictReader((res / "rows.tsv").open(), delimiter="\t"))
    assert sorted(r["experiment"] for r in rows) == sorted(STUDY)  # every experiment file is a run of a row
    assert {r["status"] for r in rows} == {"ok"}
    for cfg in STUDY.values():
        (run,) = (res / "runs" / "ptb" / cfg.name).iterdir()
        assert json.loads((run / "eval.json").read_text())
        assert not (run / "ckpt").exists()  # checkpoints go once evaluated (KEEP_CKPT=1 keeps them)

    pairs = list(csv.DictReader((res / "report" / "ptb" / "pairs.csv").open()))
    expected = {
        (cfg.name, other.name)
        for cfg in STUDY.values() if cfg.model.core == "deq"
        for other in STUDY.values() if other.model.core == "unrolled" and other.pair == cfg.pair
    }  # fmt: skip
    assert {(p["deq_experiment"], p["unrolled_experiment"]) for p in pairs} == expected
    assert len(expected) == 4  # three widths, and the 8-layer baseline beside the 4-layer one at d_model 256
    assert all(p["gap_pct"] and int(p["train_tokens"]) == 20 * 16 * 70 for p in pairs)
