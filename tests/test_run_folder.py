"""The run folder has one owner: an evaluation reads each of its files once, writes replace the cached copy,
and no other module of the package spells a run-folder file's name."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from deqlm.eval.cli import main as eval_main
from deqlm.infra import run_folder
from deqlm.infra.run_folder import CAPS, CONFIG, ENV, EVAL, METRICS, RunError, RunFolder
from test_eval_perplexity import make_trained_run

SRC = Path(__file__).resolve().parents[1] / "src" / "deqlm"
FILE_NAMES = ("config.yaml", "env.json", "metrics.jsonl", "eval.json", "last.pt", "best.pt",
              "solver_caps.json")


def _count_reads(monkeypatch) -> Counter:
    """Every whole-file text read in this process, by file name (Path.read_text is how files are read)."""
    counts: Counter = Counter()
    real = Path.read_text

    def counting(self, *args, **kwargs):
        counts[self.name] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    return counts


@pytest.mark.parametrize("caps", [False, True])
def test_an_evaluation_reads_the_config_and_the_eval_record_at_most_once(tmp_path, monkeypatch, caps):
    run, _ = make_trained_run(tmp_path, "deq")
    if caps:  # the sweep runs after the evaluation, on the same folder: still one read of each
        eval_main([str(run), "split=test", "max_tokens=200"])
    counts = _count_reads(monkeypatch)
    args = [str(run), "split=test", "max_tokens=200", *(["caps=1,2"] if caps else [])]
    assert eval_main(args) == 0
    assert counts[CONFIG] == 1 and counts[EVAL] <= 1, counts
    assert (run / EVAL).is_file() and (run / CAPS).is_file() == caps


def test_a_folder_of_runs_is_evaluated_reading_each_config_once(tmp_path, monkeypatch):
    run, _ = make_trained_run(tmp_path, "unrolled")
    counts = _count_reads(monkeypatch)
    assert eval_main([str(run.parent.parent), "split=test", "max_tokens=200"]) == 0
    assert counts[CONFIG] == 1 and counts[EVAL] <= 1, counts


def test_what_a_run_folder_writes_is_what_it_reads_back_without_a_second_read(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_eval_record({"test_ppl": 12.5})
    folder.write_solver_caps({"points": []})
    assert folder.eval_record() == {"test_ppl": 12.5} and folder.solver_caps() == {"points": []}
    assert folder.reads == Counter()  # served from what was written
    assert json.loads((tmp_path / EVAL).read_text()) == {"test_ppl": 12.5}


def test_a_corrupt_eval_record_is_one_line_naming_the_run_and_the_file(tmp_path):
    (tmp_path / EVAL).write_text("[1, 2]")
    expected = rf"{re.escape(str(tmp_path))}: corrupt {re.escape(EVAL)} \(not a JSON"
    with pytest.raises(RunError, match=expected):
        RunFolder(tmp_path).eval_record()


def test_only_eval_settings_change_after_training(tmp_path):
    run, _ = make_trained_run(tmp_path, "unrolled")
    folder = RunFolder(run)
    assert folder.config(("eval.mem_len=7",)).eval.mem_len == 7
    with pytest.raises(RunError, match="only eval.* settings"):
        folder.config(("model.d_model=8",))
    assert folder.reads[CONFIG] == 1


def test_truncating_the_log_drops_later_events_and_forgets_the_cached_copy(tmp_path):
    folder = RunFolder(tmp_path)
    folder.metrics_path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert [e["step"] for e in folder.metrics()] == [1, 2, 3]
    folder.truncate_metrics(2)
    assert [e["step"] for e in folder.metrics()] == [1, 2]


def test_a_checkpoint_is_saved_and_loaded_through_the_folder(tmp_path):
    folder = RunFolder(tmp_path)
    folder.ckpt_dir.mkdir()
    folder.save_checkpoint(run_folder.LAST, {"model": {"w": torch.ones(2)}, "step": 4})
    assert folder.load_resume_checkpoint()["step"] == 4
    path, state = folder.load_eval_checkpoint()  # no best checkpoint: the last one
    assert path.name == run_folder.LAST and state["step"] == 4


def test_no_module_but_the_run_folder_names_a_run_folder_file():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "infra" / "run_folder.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(SRC)}: {name}" for name in FILE_NAMES if name in text]
    assert offenders == []
    assert {CONFIG, ENV, METRICS, EVAL, CAPS} <= set(FILE_NAMES)


RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_every_committed_run_config_loads_and_resolves_to_the_settings_its_evaluation_recorded():
    from deqlm.eval.settings import resolve_eval_settings

    runs = run_folder.discover_runs(RESULTS)
    assert runs, "no committed runs found"
    checked = 0
    for path in runs:
        folder = RunFolder(path)
        cfg = folder.config()  # raises on a config that no longer loads
        record = folder.eval_record()
        if record and record.get("settings"):
            settings = record["settings"]
            assert resolve_eval_settings(cfg).record(settings["max_tokens"]) == settings, path
            checked += 1
    assert checked >= len(runs) // 2
