"""What an evaluation asks for (`EvalRequest`, from the command line) and how it runs (`EvalSettings`,
resolved from a run's config once, then handed to the loop, the solver and the eval record alike).

`eval.f_max_iter`, `eval.f_tol` and `eval.clamp_len` are null ("not set") unless an experiment or the
command line sets them: then the model's own setting applies. `resolve_eval_settings` is the one place that
reads them, and the one place the evaluation's solver cap is decided (the DEQ layer only ever uses the cap
it is handed); what it returns holds the values really used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from deqlm.config import ExperimentConfig

SPLITS = ("valid", "test")
# the compute knob's forward caps (`caps=default`): from one step to past every training cap
DEFAULT_CAPS = (1, 2, 4, 8, 12, 16, 30)


@dataclass
class EvalRequest:
    """What to evaluate and how: parsed from the command line (``split=``, ``eval.*=``, ...)."""

    eval_overrides: tuple[str, ...] = ()  # dotlist ``eval.key=value`` applied on top of the run's config
    splits: tuple[str, ...] = SPLITS  # which splits to evaluate
    max_tokens: int = 0  # cap per split (0: whole split; anything else is a smoke check, marked partial)
    device: str = ""  # "" : the run's train.device (auto: cuda when available)
    force: bool = False  # re-evaluate runs whose eval record is up to date
    solver_caps: tuple[int, ...] = ()  # DEQ runs: test ppl at each of these forward caps


@dataclass(frozen=True)
class EvalSettings:
    """The Transformer-XL protocol's settings for one model; everything that changes an evaluation number.

    The solver fields are None for a model without a solver (an unrolled core)."""

    batch_size: int  # batch columns the split is cut into
    tgt_len: int  # segment length
    mem_len: int  # memory carried from segment to segment
    clamp_len: int  # relative positions beyond this share one embedding (-1: no clamp, the model's meaning)
    f_max_iter: int | None  # forward solver step cap
    f_tol: float | None  # forward solver tolerance
    f_solver: str | None  # forward solver (recorded: it changes the number)
    stop_mode: str | None  # how f_tol is measured (recorded)

    def model_kwargs(self) -> dict[str, Any]:
        """This protocol's keyword arguments of `SequenceLM.forward`: memory, clamp and solver overrides."""
        solver = None if self.f_max_iter is None else {"max_iter": self.f_max_iter, "tol": self.f_tol}
        return {"mem_len": self.mem_len, "clamp_len": self.clamp_len, "solver": solver}

    def record(self, max_tokens: int) -> dict[str, Any]:
        """The eval record's ``settings``: these values plus the split cap; equal records give interchangeable
        numbers."""
        return {**dataclasses.asdict(self), "max_tokens": max_tokens}


def resolve_eval_settings(cfg: ExperimentConfig) -> EvalSettings:
    """The settings `cfg` asks for, every "not set" marker replaced by the value it stands for.

    Forward cap: `eval.f_max_iter`, else `deq.f_max_iter`; tolerance: `eval.f_tol`, else `deq.f_tol`;
    clamp: `eval.clamp_len`, else `model.clamp_len`."""
    e, d = cfg.eval, cfg.deq

    def unless_unset(value, fallback):
        return fallback if value is None else value

    is_deq = cfg.model.core == "deq"
    return EvalSettings(
        batch_size=e.batch_size,
        tgt_len=e.tgt_len,
        mem_len=e.mem_len,
        clamp_len=unless_unset(e.clamp_len, cfg.model.clamp_len),
        f_max_iter=unless_unset(e.f_max_iter, d.f_max_iter) if is_deq else None,
        f_tol=unless_unset(e.f_tol, d.f_tol) if is_deq else None,
        f_solver=d.f_solver if is_deq else None,
        stop_mode=d.stop_mode if is_deq else None,
    )


def is_up_to_date(existing: dict | None, ckpt: dict, settings: dict, splits: tuple[str, ...]) -> bool:
    """Whether an eval record still stands: same checkpoint (file, step, mtime), same settings record, and
    every requested split present."""
    if not existing:
        return False
    old = existing.get("checkpoint") or {}
    same_ckpt = (old.get("file"), old.get("mtime")) == (ckpt["file"], ckpt["mtime"])
    if ckpt.get("step") is not None:
        same_ckpt = same_ckpt and old.get("step") == ckpt["step"]
    have = existing.get("splits") or {}
    return same_ckpt and existing.get("settings") == settings and all(s in have for s in splits)
