"""`python -m deqlm.bench solver --quick` runs, prints one JSON line per configuration and writes --out."""

import json
import subprocess
import sys

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
