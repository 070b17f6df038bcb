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
    assert json.loads(out.read_text())["lines"] == lines


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
