"""`python -m deqlm.bench solver --quick` runs, prints one JSON line per configuration and writes --out."""

import json
import subprocess
import sys

import pytest

from deqlm.bench import solver

FIELDS = {
    "solver",
    "f_evals",
    "rel_res_max",
    "rel_res_median",
    "forward_ms",
    "train_step_ms",
    "solver_overhead",
    "peak_step_mb",
    "saved_bytes",
}


def test_quick_solver_bench_prints_json_lines_and_writes_out(tmp_path, capsys):
    out = tmp_path / "solver.json"
    assert solver.main(["--quick", "--json", "--no-torchdeq", "--out", str(out)]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    names = [line["solver"] for line in lines]
    assert names[:3] == ["deqlm.broyden", "deqlm.anderson", "deqlm.fixed_point"]
    assert any(n.startswith("unrolled.") for n in names)
    for line in lines:
        assert FIELDS <= set(line)
        assert line["f_evals"] >= 1 and line["peak_step_mb"] >= 0 and line["saved_bytes"] > 0
    deq = {line["solver"]: line for line in lines if line["solver"].startswith("deqlm.")}
    # one stored application of f, whatever the solver; an unrolled stack stores one per layer
    assert len({line["saved_bytes"] for line in deq.values()}) == 1
    for name in ("deqlm.broyden", "deqlm.anderson"):
        assert deq[name]["history_mb_per_step"] > 0 and deq[name]["history_floor"] > 0
    assert "history_floor" not in deq["deqlm.fixed_point"]
    assert json.loads(out.read_text())["lines"] == lines


def test_history_bytes_follow_the_buffer_rule():
    """Broyden step k reads its min(k, K) stored steps twice less one and writes one: with K = rank + 1 = 3
    and 5 steps the slot counts are 1, 2, 4, 6, 6; Anderson (m 2) reads N residuals and N images and
    writes two: 4, 6, 6."""
    slot = 2 * 10 * 4
    br = solver.history_bytes_per_step("broyden", {"rank": 2}, 5, 30, 2, 10)
    assert br == pytest.approx(slot * (1 + 2 + 4 + 6 + 6) / 5)
    an = solver.history_bytes_per_step("anderson", {"m": 2, "beta": 1.0}, 3, 30, 2, 10)
    assert an == pytest.approx(slot * (4 + 6 + 6) / 3)


def test_bench_dispatcher_reports_unknown_subcommand_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "deqlm.bench", "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "solver" in proc.stderr


def test_rank_sweep_reports_forward_residual_and_adjoint_steps_per_rank(capsys):
    from deqlm.bench.solver import main

    assert main(["--quick", "--json", "--rank-sweep", "2,4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["rank"] for x in lines] == [2, 4]
    for x in lines:
        assert len(x["b_nstep_per_train_step"]) == 4
        assert all(1 <= n <= x["b_max_iter"] for n in x["b_nstep_per_train_step"])


def test_rank_sweep_rejects_a_malformed_list(capsys):
    from deqlm.bench.solver import main

    with pytest.raises(SystemExit):
        main(["--quick", "--rank-sweep", "4,x"])
    assert "--rank-sweep" in capsys.readouterr().err
