"""Evaluate a trained run: the Transformer-XL perplexity protocol on whole splits, into the run's eval record.

Protocol (Dai et al. 2019, as used by Bai et al. 2019): each split is one token stream cut into
``eval.batch_size`` columns and read in segments of ``eval.tgt_len`` tokens, the memory (``eval.mem_len``)
carried from segment to segment; perplexity = exp(sum of token NLL / number of target tokens) over the whole
split. The loop itself is ``deqlm.eval.loop.evaluate``, the one the trainer validates with; this module picks
the checkpoint, resolves the eval settings (``deqlm.eval.settings``), adds word-level perplexity, the
entropy-rate bound and memory figures, and keeps splits of an eval record that are still up to date.

The number in the eval record is the run's result; the last validation figure of the training log is not (it
may be capped by ``train.eval_max_tokens``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deqlm.config import ConfigError, ExperimentConfig, to_dict
from deqlm.data.dataset import build_dataset
from deqlm.eval.convergence import convergence_record
from deqlm.eval.loop import evaluate
from deqlm.eval.settings import EvalRequest, EvalSettings, is_up_to_date, resolve_eval_settings
from deqlm.infra.io import JsonlError
from deqlm.infra.memory import MemoryMeter
from deqlm.infra.provenance import git_state, source_hash
from deqlm.infra.run_folder import RunError, RunFolder
from deqlm.infra.runtime import pick_device
from deqlm.models import build_model, count_params
from deqlm.models.weights import WeightsMismatch, load_weights

SCHEMA_VERSION = 1


def _training_events(folder: RunFolder) -> list[dict]:
    """The run's training log for the end-of-training solver figures; empty when it is missing or damaged
    (the evaluation itself does not depend on it)."""
    try:
        return folder.metrics()
    except (OSError, JsonlError):
        return []


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


def _load_data(run_dir: Path, cfg: ExperimentConfig, ckpt: dict):
    """The run's dataset, checked against the vocabulary the checkpoint was trained on."""
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
    return dataset


def _load_model(run_dir: Path, cfg: ExperimentConfig, ckpt: dict, vocab_size: int, device: torch.device):
    """The config's model holding the checkpoint's weights, on `device`, in eval mode."""
    model = build_model(cfg.model, cfg.deq, vocab_size=vocab_size)
    try:
        load_weights(model, ckpt["model"])
    except WeightsMismatch as exc:
        raise RunError(run_dir, f"the checkpoint does not fit the config's model ({exc})") from None
    return model.to(device).eval()


def evaluate_split(run_dir: Path, cfg: ExperimentConfig, model, dataset, split: str, settings: EvalSettings,
                    step: int | None, device: torch.device, max_tokens: int) -> dict:
    """One split's entry in the eval record: the loop's figures, word-level perplexity, wall time, peak
    memory."""
    meter = MemoryMeter(device)
    meter.reset()
    t0 = time.perf_counter()
    raw = evaluate(model, dataset, split, settings, step, device, max_tokens=max_tokens)
    wall_s = time.perf_counter() - t0
    subword = cfg.data.tokenizer == "sentencepiece"
    words = dataset.split_words(split) if subword and not max_tokens else None
    tokens = dataset.split_tokens(split) if words else None
    try:
        res = _split_result(raw, word_count=words, token_count=tokens, copy_task=cfg.data.dataset == "copy")
    except (KeyError, ValueError) as exc:
        raise RunError(run_dir, f"evaluation of {split!r} failed ({exc})") from None
    res["wall_s"] = wall_s
    res["peak_mem_gib"], res["peak_mem_kind"] = meter.peak_gib(), meter.kind
    return res


@dataclass
class LoadedRun:
    """A run ready to evaluate: its config, the checkpoint's weights in the model, the data, the settings."""

    folder: RunFolder
    cfg: ExperimentConfig
    step: int | None
    ckpt_info: dict
    settings: EvalSettings
    device: torch.device
    dataset: Any
    model: torch.nn.Module


def load_run(folder: RunFolder, req: EvalRequest) -> LoadedRun:
    """The run's config (with the request's eval overrides), the checkpoint to evaluate, data and model."""
    run_dir = folder.path
    cfg = folder.config(req.eval_overrides, req.device)
    ckpt_path, ckpt = folder.load_eval_checkpoint()
    step = None if ckpt.get("step") is None else int(ckpt["step"])
    try:
        device = pick_device(cfg.train.device)
    except ConfigError as exc:
        raise RunError(run_dir, str(exc)) from None
    dataset = _load_data(run_dir, cfg, ckpt)
    model = _load_model(run_dir, cfg, ckpt, dataset.vocab_size, device)
    return LoadedRun(folder, cfg, step, folder.checkpoint_record(ckpt_path, step), resolve_eval_settings(cfg),
                     device, dataset, model)


def evaluate_run(run: str | os.PathLike | RunFolder, req: EvalRequest | None = None, *, log=print) -> dict:
    """Evaluate one run folder and write its eval record (atomically); returns the record written."""
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    run_dir, req = folder.path, req or EvalRequest()
    run = load_run(folder, req)
    cfg, step, settings, device, dataset, model = (run.cfg, run.step, run.settings, run.device, run.dataset,
                                                   run.model)
    recorded, ckpt_info = settings.record(req.max_tokens), run.ckpt_info

    existing = folder.eval_record()
    splits: dict[str, dict] = {}
    if existing and is_up_to_date(existing, ckpt_info, recorded, ()):
        splits.update(existing.get("splits") or {})  # keep splits evaluated earlier with these exact settings
    for split in req.splits:
        res = splits[split] = evaluate_split(run_dir, cfg, model, dataset, split, settings, step, device,
                                              req.max_tokens)
        shown = f"loss {res['loss']:.4g}" if res["ppl"] is None else f"ppl {res['ppl']:.3f}"
        log(f"{run_dir}: {split} {shown} over {res['n_tokens']} tokens ({res['tokens_per_s']:.0f} tok/s)")

    record = build_record(folder, cfg, recorded, ckpt_info, splits, dataset, model, device)
    fresh = [splits[s] for s in req.splits]
    record["peak_mem_gib"] = max(res["peak_mem_gib"] for res in fresh)
    record["peak_mem_kind"] = fresh[-1]["peak_mem_kind"]
    folder.write_eval_record(record)
    return record


def build_record(folder: RunFolder, cfg: ExperimentConfig, settings: dict, ckpt_info: dict, splits: dict,
                 dataset, model, device: torch.device) -> dict:
    """The eval record (schema in docs/evaluation.md); flat ``<split>_ppl`` keys duplicate ``splits``."""
    entropy = getattr(dataset, "entropy_rate", None)
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "run": str(folder.path),
        "experiment": cfg.name,
        "corpus": cfg.data.dataset,
        "core": cfg.model.core,
        "arch": cfg.model.arch,
        "pair": cfg.pair,
        "paper_row": cfg.paper_row,
        "paper_test": cfg.paper_test,
        "checkpoint": ckpt_info,
        "mode": model.mode(ckpt_info["step"]),
        "settings": settings,
        "partial": bool(settings["max_tokens"]),
        **{k: int(v) for k, v in count_params(model).items()},
        "best_possible_ppl": math.exp(entropy) if entropy is not None else None,
        "splits": splits,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_eval": to_dict(cfg.eval),
        "convergence": convergence_record(cfg.model.core, splits, _training_events(folder)),
        "eval_code": {**git_state(), **source_hash()},  # the code that computed these figures
    }
    for split, res in splits.items():
        record[f"{split}_loss"] = res["loss"]
        record[f"{split}_ppl"] = res["ppl"]
        if "word_ppl" in res:
            record[f"{split}_word_ppl"] = res["word_ppl"]
    return record
