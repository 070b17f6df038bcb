"""Evaluate a trained run: the Transformer-XL perplexity protocol on whole splits, written to ``eval.json``.

Protocol (Dai et al. 2019, as used by Bai et al. 2019): each split is one token stream cut into
``eval.batch_size`` columns and read in segments of ``eval.tgt_len`` tokens, the memory (``eval.mem_len``)
carried from segment to segment; perplexity = exp(sum of token NLL / number of target tokens) over the whole
split. The loop itself is ``deqlm.train.trainer.evaluate``, the one the trainer validates with; this module
picks the checkpoint, applies the eval settings, adds word-level perplexity, the entropy-rate bound and memory
figures, and decides whether an existing ``eval.json`` is still up to date.

The number in ``eval.json`` is the run's result; the last validation figure of the training log is not (it may
be capped by ``train.eval_max_tokens`` and uses the training-time solver settings).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deqlm.config import ConfigError, ExperimentConfig, load_config, to_dict
from deqlm.data.errors import DataError
from deqlm.exits import BAD_INPUT, FAILED, OK, describe, error, warn
from deqlm.io import atomic_write_json

EVAL_FILE = "eval.json"
CKPT_ORDER = ("best.pt", "last.pt")  # the best-validation checkpoint when there is one
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "env.json", "ckpt")  # what makes a folder look like a run
SPLITS = ("valid", "test")
SCHEMA_VERSION = 1


class RunError(Exception):
    """A problem with one run directory, reported as one line ``error: <run>: <what>``."""

    def __init__(self, run: str | os.PathLike, what: str):
        super().__init__(f"{run}: {what}")
        self.run = str(run)
        self.what = what


@dataclass
class EvalRequest:
    """What to evaluate and how: parsed from the command line (``split=``, ``eval.*=``, ...)."""

    eval_overrides: tuple[str, ...] = ()  # dotlist ``eval.key=value`` applied on top of the run's config
    splits: tuple[str, ...] = SPLITS  # which splits to evaluate
    max_tokens: int = 0  # cap per split (0: whole split; anything else is a smoke check, marked partial)
    device: str = ""  # "" : the run's train.device (auto: cuda when available)
    force: bool = False  # re-evaluate runs whose eval.json is up to date


# ------------------------------------------------------------------------------------------------
# run directories


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


def find_checkpoint(run_dir: Path) -> Path:
    for name in CKPT_ORDER:
        path = run_dir / "ckpt" / name
        if path.is_file():
            return path
    raise RunError(run_dir, f"no checkpoint (looked for ckpt/{' and ckpt/'.join(CKPT_ORDER)})")


def load_run_config(run_dir: Path, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """The run's resolved ``config.yaml`` plus ``eval.*`` overrides (only eval settings may change now)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunError(run_dir, "missing config.yaml")
    for item in overrides:
        if not item.startswith("eval."):
            raise RunError(
                run_dir, f"override {item!r}: only eval.* settings can be changed at evaluation time"
            )
    try:
        return load_config(path, overrides)
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


# ------------------------------------------------------------------------------------------------
# settings and staleness


def eval_settings(cfg: ExperimentConfig, req: EvalRequest) -> dict:
    """Everything that changes an evaluation number; two evaluations with equal settings are interchangeable.

    ``f_max_iter`` / ``f_tol`` are the values the solver really uses (0 in the config means "the model's").
    """
    e, d = cfg.eval, cfg.deq
    is_deq = cfg.model.core == "deq"
    f_max_iter = e.f_max_iter or d.eval_f_max_iter or d.f_max_iter
    return {
        "batch_size": e.batch_size,
        "tgt_len": e.tgt_len,
        "mem_len": e.mem_len,
        "clamp_len": e.clamp_len if e.clamp_len >= 0 else cfg.model.clamp_len,
        "f_max_iter": f_max_iter if is_deq else None,
        "f_tol": (e.f_tol or d.f_tol) if is_deq else None,
        "f_solver": d.f_solver if is_deq else None,
        "stop_mode": d.stop_mode if is_deq else None,
        "max_tokens": req.max_tokens,
    }


def checkpoint_id(run_dir: Path, ckpt_path: Path, step: int | None) -> dict:
    return {
        "file": ckpt_path.relative_to(run_dir).as_posix(),
        "step": step,
        "mtime": ckpt_path.stat().st_mtime,
    }


def is_up_to_date(existing: dict | None, ckpt: dict, settings: dict, splits: tuple[str, ...]) -> bool:
    """Same checkpoint (file, step, mtime), same settings, and every requested split present."""
    if not existing:
        return False
    old = existing.get("checkpoint") or {}
    same_ckpt = (old.get("file"), old.get("mtime")) == (ckpt["file"], ckpt["mtime"])
    if ckpt.get("step") is not None:
        same_ckpt = same_ckpt and old.get("step") == ckpt["step"]
    have = existing.get("splits") or {}
    return same_ckpt and existing.get("settings") == settings and all(s in have for s in splits)


def _checkpoint_step_cheap(existing: dict | None, ckpt_path: Path, run_dir: Path) -> int | None:
    """The step eval.json recorded for this exact checkpoint file (an up-to-date check need not load it)."""
    old = (existing or {}).get("checkpoint") or {}
    if (
        old.get("file") == ckpt_path.relative_to(run_dir).as_posix()
        and old.get("mtime") == ckpt_path.stat().st_mtime
    ):
        return old.get("step")
    return None


# ------------------------------------------------------------------------------------------------
# evaluation


def _resolve_device(name: str):
    import torch

    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available")
    return torch.device(name)


def _peak_memory_gib(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS; process-lifetime peak (includes data loading).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, "cpu_max_rss"


def _load_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The first readable checkpoint of CKPT_ORDER. A damaged best.pt falls back to an intact last.pt, said in
    one line: the last weights still give a result where stopping gives none, and eval.json names the file."""
    from deqlm.train.checkpoint import CheckpointError, load_checkpoint

    first = find_checkpoint(run_dir)
    damaged: list[str] = []
    for name in CKPT_ORDER[CKPT_ORDER.index(first.name) :]:
        path = run_dir / "ckpt" / name
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            damaged.append(f"ckpt/{name} is damaged ({exc.reason})")
            continue
        if damaged:
            warn(f"{run_dir}: {damaged[0]}; evaluating ckpt/{name} instead")
        return path, ckpt
    raise RunError(run_dir, "; ".join(damaged))


def _split_result(raw: dict, *, word_count: int | None, token_count: int | None, copy_task: bool) -> dict:
    """Exact token-weighted figures from evaluate()'s sums, plus whatever else it measured (solver means).

    `word_count` / `token_count` (subword runs): the split's words and tokens. The protocol scores all but the
    first token of each batch column, so the scored NLL covers `n_tokens` of `token_count` tokens; word-level
    perplexity spreads the mean NLL per token over the split's words, exp(loss * tokens / words), instead of
    dividing the scored sum by all the words (which would read slightly low)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    nll_sum, n_tokens = float(raw["nll_sum"]), int(raw["n_tokens"])
    if n_tokens <= 0:
        raise ValueError("the split produced no target tokens")
    out["nll_sum"] = nll_sum
    out["n_tokens"] = n_tokens
    out["loss"] = nll_sum / n_tokens  # mean NLL per token (nats); for copy memory: mean CE per position
    out["ppl"] = math.exp(min(out["loss"], 700.0))
    if word_count and token_count:
        out["n_words"] = int(word_count)
        out["word_ppl"] = math.exp(min(out["loss"] * token_count / word_count, 700.0))
    if copy_task:
        out["ppl"] = (
            None  # perplexity of a 10-class position classifier means nothing; the loss is the figure
        )
    return out


def evaluate_run(run_dir: str | os.PathLike, req: EvalRequest | None = None, *, log=print) -> dict:
    """Evaluate one run directory and write its ``eval.json`` (atomically); returns the record written."""
    import torch

    run_dir, req = Path(run_dir), req or EvalRequest()
    cfg = load_run_config(run_dir, req.eval_overrides)
    ckpt_path, ckpt = _load_checkpoint(run_dir)

    from deqlm.data import build_dataset
    from deqlm.models import build_model, count_params
    from deqlm.train.trainer import evaluate

    step = ckpt.get("step")
    step = int(step) if step is not None else None
    settings = eval_settings(cfg, req)
    ckpt_info = checkpoint_id(run_dir, ckpt_path, step)
    try:
        device = _resolve_device(req.device or cfg.train.device)
    except ValueError as exc:
        raise RunError(run_dir, str(exc)) from None

    try:
        dataset = build_dataset(cfg.data)
    except (OSError, ValueError) as exc:
        raise RunError(
            run_dir, f"cannot build dataset {cfg.data.dataset!r} ({str(exc).splitlines()[0]})"
        ) from None
    saved_hash = ckpt.get("vocab_hash")
    if saved_hash is not None and getattr(dataset, "vocab_hash", None) not in (None, saved_hash):
        raise RunError(
            run_dir, f"vocabulary differs from the checkpoint's ({dataset.vocab_hash} != {saved_hash})"
        )

    model = build_model(cfg.model, cfg.deq, vocab_size=dataset.vocab_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise RunError(
            run_dir, f"checkpoint does not fit the config's model ({str(exc).splitlines()[0]})"
        ) from None
    model.to(device).eval()
    model.set_eval_solver(
        f_max_iter=cfg.eval.f_max_iter or None,
        f_tol=cfg.eval.f_tol or None,
        mem_len=cfg.eval.mem_len,
        clamp_len=cfg.eval.clamp_len if cfg.eval.clamp_len >= 0 else None,
    )

    existing = read_eval_json(run_dir)
    splits: dict[str, dict] = {}
    if existing and is_up_to_date(existing, ckpt_info, settings, ()):
        splits.update(existing.get("splits") or {})  # keep splits evaluated earlier with these exact settings
    copy_task = cfg.data.dataset == "copy"
    subword = cfg.data.tokenizer == "sentencepiece"
    peak_gib, peak_kind = 0.0, ""
    for split in req.splits:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            raw = evaluate(model, dataset, split, cfg.eval, step, device, max_tokens=req.max_tokens)
        wall_s = time.perf_counter() - t0
        words = dataset.split_words(split) if subword and not req.max_tokens else None
        tokens = dataset.split_tokens(split) if words else None
        try:
            res = _split_result(raw, word_count=words, token_count=tokens, copy_task=copy_task)
        except (KeyError, ValueError) as exc:
            raise RunError(run_dir, f"evaluation of {split!r} failed ({exc})") from None
        res["wall_s"] = wall_s
        res.setdefault("tokens_per_s", res["n_tokens"] / max(wall_s, 1e-9))
        res["peak_mem_gib"], res["peak_mem_kind"] = _peak_memory_gib(device)
        peak_gib, peak_kind = max(peak_gib, res["peak_mem_gib"]), res["peak_mem_kind"]
        splits[split] = res
        shown = f"loss {res['loss']:.4g}" if copy_task else f"ppl {res['ppl']:.3f}"
        log(f"{run_dir}: {split} {shown} over {res['n_tokens']} tokens ({res['tokens_per_s']:.0f} tok/s)")

    record = build_record(run_dir, cfg, settings, ckpt_info, splits, dataset, model, count_params, device)
    record["peak_mem_gib"], record["peak_mem_kind"] = peak_gib, peak_kind
    atomic_write_json(run_dir / EVAL_FILE, record)
    return record


def build_record(run_dir, cfg, settings, ckpt_info, splits, dataset, model, count_params, device) -> dict:
    """The eval.json object (schema in docs/evaluation.md); flat ``<split>_ppl`` keys duplicate ``splits``."""
    import torch

    entropy = getattr(dataset, "entropy_rate", None)
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "run": str(run_dir),
        "experiment": cfg.name,
        "corpus": cfg.data.dataset,
        "core": cfg.model.core,
        "arch": cfg.model.arch,
        "pair": cfg.pair,
        "paper_row": cfg.paper_row,
        "paper_test": cfg.paper_test,
        "checkpoint": ckpt_info,
        "mode": model.mode(ckpt_info["step"]) if hasattr(model, "mode") else None,
        "settings": settings,
        "partial": bool(settings["max_tokens"]),
        **{k: int(v) for k, v in count_params(model).items()},
        "best_possible_ppl": math.exp(entropy) if entropy is not None else None,
        "splits": splits,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_eval": to_dict(cfg.eval),
    }
    for split, res in splits.items():
        record[f"{split}_loss"] = res["loss"]
        record[f"{split}_ppl"] = res["ppl"]
        if "word_ppl" in res:
            record[f"{split}_word_ppl"] = res["word_ppl"]
    return record


# ------------------------------------------------------------------------------------------------
# command line


USAGE = """usage: python -m deqlm.eval RUN_DIR|ROOT [split=valid,test] [eval.KEY=VALUE ...]
                        [max_tokens=N] [device=cpu|cuda] [force=true]
RUN_DIR: evaluate that run. ROOT (e.g. results/runs): every run below it lacking an up-to-date eval.json."""


def parse_args(argv: list[str]) -> tuple[list[Path], EvalRequest]:
    paths: list[Path] = []
    overrides: list[str] = []
    req = EvalRequest()
    for arg in argv:
        if "=" not in arg:
            paths.append(Path(arg))
            continue
        key, value = arg.split("=", 1)
        if key.startswith("eval."):
            overrides.append(arg)
        elif key in ("split", "splits"):
            chosen = tuple(s for s in value.split(",") if s)
            bad = [s for s in chosen if s not in SPLITS]
            if bad or not chosen:
                raise ValueError(f"split={value!r}: choose from {', '.join(SPLITS)} (comma-separated)")
            req.splits = chosen
        elif key == "max_tokens":
            if not value.isdigit():
                raise ValueError(f"max_tokens={value!r} must be a non-negative integer")
            req.max_tokens = int(value)
        elif key == "device":
            req.device = value
        elif key == "force":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"force={value!r} must be true or false")
            req.force = value.lower() in ("true", "1")
        elif "." in key:
            raise ValueError(f"{arg!r}: only eval.* settings can be changed at evaluation time")
        else:
            raise ValueError(
                f"unknown argument {arg!r} (expected split=, max_tokens=, device=, force= or eval.*=)"
            )
    if not paths:
        raise ValueError("give a run directory or a folder of runs (e.g. results/runs)")
    req.eval_overrides = tuple(overrides)
    return paths, req


def _plan(run_dir: Path, req: EvalRequest) -> bool:
    """True when the run needs evaluating (eval.json missing or stale); RunError for a bad run."""
    cfg = load_run_config(run_dir, req.eval_overrides)
    ckpt_path = find_checkpoint(run_dir)
    existing = read_eval_json(run_dir)
    step = _checkpoint_step_cheap(existing, ckpt_path, run_dir)
    if step is None:
        return True
    return not is_up_to_date(
        existing, checkpoint_id(run_dir, ckpt_path, step), eval_settings(cfg, req), req.splits
    )


def _exit_code(exc: Exception) -> int:
    """BAD_INPUT for a problem with what was asked (a bad run directory, setting or corpus), as train says it;
    FAILED for a crash inside the model or data code."""
    return BAD_INPUT if isinstance(exc, (RunError, ConfigError, DataError)) else FAILED


def _failure(run: Path, exc: Exception) -> str:
    return str(exc) if isinstance(exc, RunError) else f"{run}: {type(exc).__name__}: {describe(exc)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return OK
    try:
        paths, req = parse_args(argv)
    except ValueError as exc:
        return error(str(exc), BAD_INPUT)
    missing = [p for p in paths if not p.exists()]
    if missing:
        return error(f"{missing[0]}: no such directory", BAD_INPUT)

    if len(paths) == 1 and is_run_dir(paths[0]):  # one named run: always evaluate, failures are errors
        try:
            evaluate_run(paths[0], req)
        except Exception as exc:  # a crash inside the model or data code too: one line, not a traceback
            return error(_failure(paths[0], exc), _exit_code(exc))
        return OK

    runs = [r for p in paths for r in discover_runs(p)]
    if not runs:
        return error(f"{', '.join(map(str, paths))}: no run directories found", BAD_INPUT)
    n_done = n_fresh = 0
    failed: list[int] = []  # the exit code each skipped run would have had on its own
    for run in runs:
        try:
            if not req.force and not _plan(run, req):
                n_fresh += 1
                print(f"up to date: {run}")
                continue
            evaluate_run(run, req)
            n_done += 1
        except Exception as exc:  # one broken run must not stop the others
            failed.append(_exit_code(exc))
            warn(f"{_failure(run, exc)} (skipped)")
    print(f"evaluated {n_done}, up to date {n_fresh}, skipped {len(failed)} of {len(runs)} runs")
    if not failed or n_done or n_fresh:
        return OK
    return failed[0] if len(set(failed)) == 1 else FAILED
