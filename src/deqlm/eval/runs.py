"""Run directories as the evaluator and the report see them: finding runs, their config, the checkpoint to
evaluate, their ``eval.json``, and whether that file is still up to date.

Nothing here loads torch until a checkpoint is read (the command lines answer ``--help`` before torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deqlm.checkpoint_io import BEST, CKPT_DIR, LAST, CheckpointError, checkpoint_path, load_checkpoint
from deqlm.config import ConfigError, ExperimentConfig, load_config
from deqlm.exits import warn

EVAL_FILE = "eval.json"
ENV_FILE = "env.json"  # the process facts and the code's provenance (deqlm.runtime.write_env)
CODE_NOT_RECORDED = "code not recorded"
CAPS_FILE = "solver_caps.json"  # the DEQ's test ppl at several forward solver caps (deqlm.eval.solver_caps)
EVAL_ORDER = (BEST, LAST)  # the best-validation weights when there are some
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "env.json", CKPT_DIR)  # what makes a folder look like a run


class RunError(Exception):
    """A problem with one run directory, reported as one line ``error: <run>: <what>``."""

    def __init__(self, run: str | os.PathLike, what: str):
        super().__init__(f"{run}: {what}")
        self.run = str(run)
        self.what = what


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def discover_runs(root: Path) -> list[Path]:
    """Run directories at or below ``root``, sorted; a run directory's own sub-folders are not searched."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            found.append(here)
            dirnames[:] = []
        else:
            dirnames.sort()
    return sorted(found)


def has_checkpoint(run_dir: Path) -> bool:
    return any(checkpoint_path(run_dir, name).is_file() for name in EVAL_ORDER)


def find_checkpoint(run_dir: Path) -> Path:
    """The checkpoint an evaluation reads: the first of EVAL_ORDER that exists."""
    for name in EVAL_ORDER:
        path = checkpoint_path(run_dir, name)
        if path.is_file():
            return path
    looked = " and ".join(f"{CKPT_DIR}/{name}" for name in EVAL_ORDER)
    raise RunError(run_dir, f"no checkpoint (looked for {looked})")


def load_run_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The first readable checkpoint of EVAL_ORDER. A damaged best.pt falls back to an intact last.pt, said in
    one line: the last weights still give a result where stopping gives none, and eval.json names the file."""
    first = find_checkpoint(run_dir)
    damaged: list[str] = []
    for name in EVAL_ORDER[EVAL_ORDER.index(first.name) :]:
        path = checkpoint_path(run_dir, name)
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            damaged.append(f"{CKPT_DIR}/{name} is damaged ({exc.reason})")
            continue
        if damaged:
            warn(f"{run_dir}: {damaged[0]}; evaluating {CKPT_DIR}/{name} instead")
        return path, ckpt
    raise RunError(run_dir, "; ".join(damaged))


def load_run_config(run_dir: Path, overrides: tuple[str, ...] = (), device: str = "") -> ExperimentConfig:
    """The run's resolved ``config.yaml`` plus ``eval.*`` overrides (only eval settings may change now);
    `device` ("": the run's own) takes the place of ``train.device``, checked like it."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(run_dir, "missing config.yaml")
    for item in overrides:
        if not item.startswith("eval."):
            raise RunError(
                run_dir, f"override {item!r}: only eval.* settings can be changed at evaluation time"
            )
    try:
        return load_config(path, [*overrides, *([f"train.device={device}"] if device else [])])
    except ConfigError as exc:
        raise RunError(run_dir, str(exc)) from None


def read_eval_json(run_dir: Path) -> dict | None:
    """The run's ``eval.json``, None when absent; a file that is not a JSON object is a RunError."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(run_dir, f"corrupt {EVAL_FILE} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunError(run_dir, f"corrupt {EVAL_FILE} (not a JSON object)")
    return data


def read_env(run_dir: Path) -> dict | None:
    """The run's ``env.json``, None when absent or unreadable (older runs may lack one)."""
    try:
        data = json.loads((run_dir / ENV_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def code_label(env: dict | None, patch_saved: bool) -> str:
    """The report's ``code`` cell: the short commit, ``+patch`` when the checkout was dirty and its patch is
    in the run folder (`patch_saved`), ``+partial patch`` when untracked files were left out of it; a run
    from outside git is named by its source hash (``src:<hash>``). A dirty checkout without its patch, or no
    record at all, is CODE_NOT_RECORDED: nobody can rebuild it."""
    env = env or {}
    sha, dirty = env.get("git_sha"), env.get("git_dirty")
    if sha and (dirty is False or (dirty and patch_saved)):
        partial = dirty and env.get("git_untracked_skipped")  # untracked files too large for the patch
        return sha[:7] + ("+partial patch" if partial else "+patch" if dirty else "")
    if not sha and env.get("source_sha256"):
        return "src:" + env["source_sha256"][:7]
    return CODE_NOT_RECORDED


def run_code(run_dir: Path) -> str:
    """`code_label` of the run's own env.json and patch."""
    env = read_env(run_dir)
    patch = (env or {}).get("git_patch")
    return code_label(env, bool(patch) and (run_dir / str(patch)).is_file())


def checkpoint_id(run_dir: Path, ckpt_path: Path, step: int | None) -> dict:
    return {
        "file": ckpt_path.relative_to(run_dir).as_posix(),
        "step": step,
        "mtime": ckpt_path.stat().st_mtime,
    }


def is_up_to_date(existing: dict | None, ckpt: dict, settings: dict, splits: tuple[str, ...]) -> bool:
    """Same checkpoint (file, step, mtime), same settings record, and every requested split present."""
    if not existing:
        return False
    old = existing.get("checkpoint") or {}
    same_ckpt = (old.get("file"), old.get("mtime")) == (ckpt["file"], ckpt["mtime"])
    if ckpt.get("step") is not None:
        same_ckpt = same_ckpt and old.get("step") == ckpt["step"]
    have = existing.get("splits") or {}
    return same_ckpt and existing.get("settings") == settings and all(s in have for s in splits)


def recorded_step(existing: dict | None, ckpt_path: Path, run_dir: Path) -> int | None:
    """The step eval.json recorded for this exact checkpoint file (an up-to-date check need not load it)."""
    old = (existing or {}).get("checkpoint") or {}
    if (
        old.get("file") == ckpt_path.relative_to(run_dir).as_posix()
        and old.get("mtime") == ckpt_path.stat().st_mtime
    ):
        return old.get("step")
    return None


def read_solver_caps(run_dir: Path) -> dict | None:
    """The run's solver_caps.json, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((run_dir / CAPS_FILE).read_text())
    except (OSError, ValueError):
        return None


def caps_up_to_date(run_dir: Path, caps: tuple[int, ...]) -> bool:
    """Whether solver_caps.json holds these caps for the checkpoint the (up-to-date) eval.json evaluated."""
    record, ev = read_solver_caps(run_dir) or {}, read_eval_json(run_dir) or {}
    have = sorted(p.get("cap") for p in record.get("points", []))
    return bool(ev) and record.get("checkpoint") == ev.get("checkpoint") and have == sorted(caps)
