"""MetricLogger: one flat dict per event, the same keys in the run's training log, wandb and the console.

Keys are namespaced (`train/loss`, `valid/ppl`, `solver/f_nstep`, `mem/peak_gib`, ...); docs/training.md lists
the schema. JSONL is always written (rank 0); wandb is opt-in (`log.wandb_mode` or WANDB_MODE: disabled |
offline | online), imported only when enabled and kept silent apart from one line saying where its run is; its
run id is kept in the run folder so a resumed run continues the same wandb run. On a terminal a tqdm bar
shows loss, ppl, tokens/s and solver steps; otherwise plain lines. The solver figures' running means live
here too (`add_solver_stats`, `solver_means`): the trainer and the evaluation loop both average them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from typing import Any

import torch

from deqlm.infra.fmt import number
from deqlm.infra.run_folder import RunFolder

# the solver figures averaged into train/valid events (`solver/<key>`, `valid/<key>`) and eval-record splits
SOLVER_KEYS = ("f_nstep", "f_rel_res", "b_nstep", "b_rel_res", "converged_frac", "rev_recon_err")


def add_solver_stats(stats: dict | None, sums: dict[str, float], counts: dict[str, int]) -> None:
    """Add one forward's solver figures to running sums; a figure the model did not report, or a non-finite
    one (a diverged solve), is left out of its mean rather than poisoning it."""
    for key in SOLVER_KEYS:
        value = (stats or {}).get(key)
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1


def solver_means(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float | None]:
    """Every SOLVER_KEYS mean; None for a figure never reported (unrolled cores, pretraining)."""
    return {k: (sums[k] / counts[k] if counts.get(k) else None) for k in SOLVER_KEYS}


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors -> python numbers, non-finite floats -> None (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricLogger:
    """Writes events on the main rank; other ranks hold a silent logger so call sites need no branches."""

    def __init__(self, folder: RunFolder | str | os.PathLike | None, *, wandb_mode: str = "disabled",
                 wandb_project: str = "deqlm", run_name: str = "", config: dict | None = None,
                 progress: bool = True, total_steps: int = 0, start_step: int = 0, enabled: bool = True,
                 stream=None):
        self.enabled = enabled
        if folder is not None and not isinstance(folder, RunFolder):
            folder = RunFolder(folder)
        self.folder = folder
        self.stream = stream if stream is not None else sys.stdout
        self._jsonl = None
        self._wandb = None
        self._bar = None
        self.wandb_id: str | None = None
        self.wandb_note = ""  # one line for the run header saying where the wandb run is ("" when off)
        if not enabled:
            return
        if folder is not None:
            folder.path.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(folder.metrics_path, "a")  # noqa: SIM115 (closed in close())
        if wandb_mode != "disabled":
            self._start_wandb(wandb_mode, wandb_project, run_name, config or {})
        if progress and total_steps > 0 and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True,
                             desc=run_name or "train")

    def _start_wandb(self, mode: str, project: str, name: str, config: dict) -> None:
        import wandb  # only when enabled: importing wandb is slow and it is optional

        folder = self.folder
        self.wandb_id = folder.wandb_id() if folder is not None else None
        if self.wandb_id is None:
            self.wandb_id = uuid.uuid4().hex[:12]
            if folder is not None:
                folder.write_wandb_id(self.wandb_id)
        # silent: no banner and no history/summary tables at finish (they buried the run's own last lines);
        # console="off": wandb does not capture stdout/stderr, which the training log records as events
        quiet = wandb.Settings(silent=True, console="off")
        self._wandb = wandb.init(project=project, name=name or None, id=self.wandb_id, resume="allow",
                                 mode=mode, config=config, settings=quiet,
                                 dir=str(folder.path) if folder is not None else None)
        where = self._wandb.url if mode == "online" else f"{self._wandb.settings.sync_dir} (`wandb sync` it)"
        self.wandb_note = f"wandb: {mode} run {self.wandb_id}: {where}"

    def log(self, event: dict) -> dict:
        """Record one flat event; returns its JSON-safe form."""
        event = {k: _clean(v) for k, v in event.items()}
        if not self.enabled:
            return event
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(event) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in event.items() if v is not None and k != "step"},
                            step=int(event["step"]))
        self._console(event)
        return event

    def _console(self, event: dict) -> None:
        step = event.get("step")
        if "valid/loss" in event:
            ppl = event.get("valid/ppl")  # None for a position classifier (copy memory): loss is its figure
            settings = f"tgt_len {event.get('valid/tgt_len')}, mem_len {event.get('valid/mem_len')}"
            if event.get("valid/f_max_iter") is not None:  # unrolled models have no solver
                settings += f", f_max_iter {event['valid/f_max_iter']}"
            self.write(f"step {step} valid " + ("" if ppl is None else f"ppl {number(ppl)} ")
                       + f"loss {number(event['valid/loss'])} ({settings})")
        elif "train/loss" in event:
            if self._bar is not None:
                self._bar.n = int(step)
                post = {"loss": number(event["train/loss"])}
                if event.get("train/ppl") is not None:
                    post["ppl"] = number(event["train/ppl"])
                post["tok/s"] = number(event.get("speed/tokens_per_s"), 0, fixed=True)
                if event.get("solver/f_nstep") is not None:
                    post["f_nstep"] = number(event["solver/f_nstep"], 1, fixed=True)
                self._bar.set_postfix(post, refresh=True)
            else:
                ppl = event.get("train/ppl")
                text = (f"step {step} {event.get('mode')} loss {number(event['train/loss'])} "
                        + ("" if ppl is None else f"ppl {number(ppl)} ")
                        + f"lr {number(event.get('optim/lr'), 3)} "
                        + f"tok/s {number(event.get('speed/tokens_per_s'), 0, fixed=True)}")
                if event.get("solver/f_nstep") is not None:
                    text += (f" f_nstep {number(event['solver/f_nstep'], 1, fixed=True)}"
                             f" f_res {number(event.get('solver/f_rel_res'), 3)}")
                self.write(text)

    def write(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
