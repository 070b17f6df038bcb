"""The memory and speed benchmarks at CI size (`--quick`): they run, write their outputs, and the memory
figures have the shape the paper claims (DEQ saved-for-backward bytes flat in solver steps, unrolled ones
growing with depth)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from deqlm.bench import memory, speed
from deqlm.bench import protocol as P
from deqlm.bench.child import run_fresh
from deqlm.infra.memory import PeakMemory, memory_events, running_live

REPO = Path(__file__).resolve().parents[1]
MEMORY_FIELDS = {"row", "core", "pair", "device", "status", "reason", "peak_train_mem_gib",
                 "activation_bytes", "paper_mem_gib"}
SPEED_FIELDS = {"pair", "device", "size", "train_ratio", "infer_ratio", "paper_train_ratio",
                "paper_infer_ratio", "f_max_iter", "b_max_iter"}


@pytest.fixture(scope="module")
def memory_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_memory")
    assert memory.main(["--paper", "--sweep", "--quick", "--out", str(out)]) == 0
    return out


def test_every_paper_row_has_an_experiment_yaml():
    for row in P.PAPER_ROWS:
        path, _ = P.find_experiment(row)
        assert path.is_file(), row.key


def test_each_pair_holds_one_deq_and_one_unrolled_row():
    table = P.pairs()
    assert set(P.PAPER_SPEED) <= set(table)
    for deq_row, exp_row in table.values():
        assert deq_row.core == "deq" and exp_row.core == "unrolled"


def test_cpu_peak_counts_live_tensor_bytes_in_the_window():
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    resident = torch.zeros(250_000)  # 1 MB, allocated before the window: part of the peak
    peak.begin_window()
    a = torch.zeros(500_000)  # 2 MB
    b = torch.zeros(125_000)  # 0.5 MB
    del a
    c = torch.zeros(250_000)  # 1 MB
    peak.end_window()
    res = peak.result()
    assert res["method"] == "cpu_profiler_live_tensor_bytes"
    assert res["peak_bytes"] == 3_500_000
    del resident, b, c


def test_memory_quick_writes_every_output(memory_out: Path):
    for name in ("memory.json", "memory.sweep.json", "memory.md", "memory.paper.png", "memory.sweep.png"):
        assert (memory_out / name).is_file(), name
    records = json.loads((memory_out / "memory.json").read_text())
    assert records and all(MEMORY_FIELDS <= set(r) for r in records)
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    assert {r["pair"] for r in records} == {"wt103-transformer-small", "wt103-transformer-small-tied",
                                            "ptb-trellisnet"}
    assert "DEQ / unrolled" in (memory_out / "memory.md").read_text()


def test_deq_saved_bytes_do_not_grow_with_solver_steps(memory_out: Path):
    sweep = json.loads((memory_out / "memory.sweep.json").read_text())
    for key in ("wt103-deq-transformer-small", "ptb-deq-trellisnet"):
        pts = [r for r in sweep if r["axis"] == "solver_steps" and r["key"] == key]
        assert len(pts) >= 2 and all(r["status"] == "ok" for r in pts)
        assert len({r["activation_bytes"] for r in pts}) == 1, pts


def test_unrolled_saved_bytes_grow_with_depth(memory_out: Path):
    sweep = json.loads((memory_out / "memory.sweep.json").read_text())
    for key in ("wt103-txl-small-4l", "ptb-trellisnet-60l"):
        pts = sorted((r for r in sweep if r["axis"] == "depth" and r["key"] == key), key=lambda r: r["x"])
        assert pts[-1]["activation_bytes"] > pts[0]["activation_bytes"]


def test_speed_quick_writes_ratios(tmp_path: Path):
    assert speed.main(["--quick", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "speed.json").read_text())
    assert {r["pair"] for r in records} == set(speed.QUICK_PAIRS)
    for r in records:
        assert SPEED_FIELDS <= set(r)
        assert r["status"] == "ok", r["reason"]
        assert r["train_ratio"] > 0 and r["infer_ratio"] > 0
    assert (tmp_path / "speed.md").is_file() and (tmp_path / "speed.png").is_file()


def test_a_row_runs_in_a_fresh_process():
    rec = run_fresh("memory", ["--row", "wt103-deq-transformer-small", "--size", "quick", "--batch", "2",
                               "--tgt-len", "8", "--mem-len", "8"], timeout_s=300)
    assert rec["status"] == "ok", rec.get("reason")
    assert rec["core"] == "deq" and rec["peak_train_mem_bytes"] > rec["activation_bytes"] > 0


def test_unknown_row_is_a_one_line_error(tmp_path: Path, capsys):
    assert memory.main(["--paper", "--rows", "no-such-row", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-row" in err


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "bench_gpu.sh")]).returncode == 0


def test_memory_events_keep_recording_order_at_equal_timestamps():
    """A concatenation allocated and its inputs freed at the same profiler timestamp: the allocation stays
    first, so the running peak includes it (sorting by size too would put the frees first)."""
    from types import SimpleNamespace

    def ev(t, n, name="[memory]"):
        return SimpleNamespace(start_ns=lambda: t, nbytes=lambda: n, name=lambda: name,
                               device_type=lambda: "DeviceType.CPU")

    recorded = [ev(1, 100), ev(2, 100), ev(3, 200), ev(3, -100), ev(3, -100), ev(0, 0, "other"), ev(4, -200)]
    events = memory_events(recorded)
    assert events == [(1, 100), (2, 100), (3, 200), (3, -100), (3, -100), (4, -200)]
    assert max(live for _, live in running_live(events)) == 400
