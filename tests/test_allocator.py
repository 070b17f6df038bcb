"""The allocator tuning (deqlm.infra.allocator): who wins, that entry points apply it, numerics stay put."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqlm.bench.allocator import child_env, step_figures, summarise
from deqlm.infra.allocator import MIB, SETTINGS, apply_settings, decide, glibc_version

ROOT = Path(__file__).resolve().parents[1]
GLIBC = "glibc 2.36"


def test_glibc_with_nothing_set_is_tuned():
    assert decide({}, GLIBC).mode == "tune"
    assert decide({"DEQLM_ALLOCATOR": "tuned", "MALLOC_ARENA_MAX": "2"}, GLIBC).mode == "tune"
    assert decide({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, GLIBC).mode == "tune"


@pytest.mark.parametrize("env, named", [
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"MALLOC_TOP_PAD_": "0"}, "MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"}, "glibc.malloc.top_pad"),
])
def test_an_allocator_variable_set_by_the_user_wins(env, named):
    decision = decide(env, GLIBC)
    assert decision.mode == "environment" and named in decision.reason


def test_switch_turns_the_tuning_off_and_an_unknown_value_is_off_too():
    assert decide({"DEQLM_ALLOCATOR": "system"}, GLIBC).mode == "system"
    assert decide({"DEQLM_ALLOCATOR": "System "}, GLIBC).mode == "system"
    typo = decide({"DEQLM_ALLOCATOR": "jemalloc"}, GLIBC)
    assert typo.mode == "system" and "'jemalloc'" in typo.reason
    # the switch wins even over a user's MALLOC_* variable (it then only reports)
    assert decide({"DEQLM_ALLOCATOR": "system", "MALLOC_TOP_PAD_": "0"}, GLIBC).mode == "system"


def test_non_glibc_systems_and_preloaded_allocators_are_left_alone():
    assert decide({}, None).mode == "unsupported"
    assert decide({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, GLIBC).mode == "preloaded"


def test_every_setting_fits_mallopts_int_argument():
    assert all(0 < value < 2**31 for _, _, values, _ in SETTINGS for value in values)


def test_an_older_glibc_refusing_a_1_gib_mmap_threshold_gets_32_mib():
    def old_glibc(param: int, value: int) -> int:  # older glibc: value <= HEAP_MAX_SIZE / 2
        return int(param != -3 or value <= 32 * MIB)

    assert apply_settings(old_glibc)["M_MMAP_THRESHOLD"] == 32 * MIB
    assert apply_settings(lambda param, value: 0) == {name: None for name, *_ in SETTINGS}


@pytest.mark.skipif(glibc_version() is None, reason="glibc only")
def test_tune_allocator_applies_every_setting_on_this_glibc():
    code = ("import json; from deqlm.infra.allocator import tune_allocator; "
            "print(json.dumps(tune_allocator()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DEQLM_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    info = json.loads(out.stdout)
    assert info["mode"] == "tuned" and set(info["settings"]) == {name for name, *_ in SETTINGS}


def test_every_entry_point_tunes_the_allocator():
    mains = ["train/__main__.py", "eval/__main__.py", "eval/report.py", "bench/__main__.py",
             "bench/solver.py", "demo.py"]
    for rel in mains:
        text = (ROOT / "src" / "deqlm" / rel).read_text()
        assert "\ntune_allocator()\n" in text or '__main__":\n    tune_allocator()' in text, rel
    # importing the library tunes nothing
    assert "tune_allocator()" not in (ROOT / "src" / "deqlm" / "train" / "cli.py").read_text()


def _train(tmp_path: Path, variant: str) -> tuple[str, Path]:
    # Tensors above glibc's 128 KiB mmap threshold (FFN 16 x 32 x 512 floats: 1 MiB), and DEQ steps, so that
    # the tuned and default allocators really serve them from different places.
    args = [str(ROOT / "experiments" / "debug" / "transformer_deq.yaml"),
            f"train.run_dir={tmp_path / variant}", "train.max_steps=5",
            "train.log_every=1", "train.threads=1", "data.batch_size=16", "data.tgt_len=32",
            "model.d_inner=512", "model.pretrain_steps=2", "train.eval_max_tokens=512",
            "log.wandb_mode=disabled", "log.progress=false"]
    proc = subprocess.run([sys.executable, "-m", "deqlm.train", *args], capture_output=True, text=True,
                          env=child_env(variant), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = next(x[len("run_dir: "):] for x in proc.stdout.splitlines() if x.startswith("run_dir: "))
    return proc.stdout, Path(run_dir)


def test_losses_are_identical_with_the_allocator_tuned_and_with_the_system_default(tmp_path):
    runs = {v: _train(tmp_path, v) for v in ("system", "tuned")}
    losses = {}
    for variant, (stdout, run_dir) in runs.items():
        events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[variant] = [e["train/loss"] for e in events if "train/loss" in e]
        header = [x for x in stdout.splitlines() if x.startswith("allocator: ")]
        mode = json.loads((run_dir / "env.json").read_text())["allocator"]["mode"]
        if variant == "system":
            assert mode == "system" and header == ["allocator: system (DEQLM_ALLOCATOR=system)"]
        elif glibc_version() is not None:
            assert mode == "tuned" and len(header) == 1 and "DEQLM_ALLOCATOR=system" in header[0]
    assert len(losses["system"]) == 5
    assert losses["tuned"] == losses["system"]  # bit for bit


def test_bench_child_env_drops_the_callers_allocator_settings():
    base = {"MALLOC_TOP_PAD_": "0", "DEQLM_ALLOCATOR": "tuned", "PATH": "/bin"}
    assert child_env("system", base) == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
                                         "DEQLM_ALLOCATOR": "system"}
    assert "MALLOC_TOP_PAD_" not in child_env("tuned", base)
    assert child_env("env", base)["MALLOC_TRIM_THRESHOLD_"] == "17179869184"


def test_bench_speed_skips_the_first_steps_and_summary_flags_differing_losses():
    events = [{"step": s, "speed/tokens_per_s": 100.0 * s, "speed/step_ms": 1000.0, "train/loss": 1.0}
              for s in (1, 2, 3)]
    assert step_figures(events, skip=1)["tokens_per_s"] == pytest.approx(250.0)
    row = {"tokens_per_s": 1.0, "minor_faults": 10, "sys_s": 1.0, "user_s": 1.0, "wall_s": 1.0,
           "peak_rss_gib": 1.0}
    rows = [{**row, "variant": "system", "losses": [1.0]}, {**row, "variant": "tuned", "losses": [1.5]}]
    out = summarise("c", rows, ["system", "tuned"])
    assert out["losses_identical"] is False and out["ratio_vs_system"]["tuned"]["minor_faults"] == 1.0
