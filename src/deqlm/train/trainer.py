"""The one training loop for every model (DEQ or unrolled, Transformer or TrellisNet).

The trainer never asks what kind of model it holds: `model(x, y, mems, step=step) -> LMOutput`, and
`model.mode(step)` says whether this step is unrolled pretraining, DEQ, or an unrolled stack. Solver
statistics come from `LMOutput.stats` (`b_*` filled in by the implicit backward) and are logged when present.
Validation is `deqlm.eval.loop.evaluate` with the eval settings resolved once from the config, the loop and
the settings `python -m deqlm.eval` uses.

One step:  batch -> forward (bytes saved for backward counted on the last step of each log window) ->
           finite-loss check agreed by all ranks -> backward -> grad sync -> unscale, clip -> finite-norm
           check -> optimizer / scheduler step.  A non-finite loss or gradient skips the update (counted in
           `train/skipped_steps`); `train.max_bad_steps` of them in a row stop the run (TrainingDiverged).
Per step order: train, log, validate, checkpoint -- so a checkpoint at step k holds the state after all of
them and a resumed run repeats exactly what the uninterrupted one did from step k+1 on. SIGTERM or Ctrl-C
(deqlm.train.signals) ends the run after the step in flight, with a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch

from deqlm.config import ConfigError, ExperimentConfig, changed_settings, to_dict
from deqlm.data.dataset import build_dataset
from deqlm.eval.loop import evaluate
from deqlm.eval.settings import resolve_eval_settings
from deqlm.infra import distributed as dist_lib
from deqlm.infra.allocator import summary_line as allocator_summary_line
from deqlm.infra.memory import MemoryMeter, SavedTensorMeter
from deqlm.infra.metrics import SOLVER_KEYS, MetricLogger, add_solver_stats, solver_means
from deqlm.infra.provenance import env_record
from deqlm.infra.run_folder import BEST, LAST, RunError, RunFolder, WriteFailed, make_run_dir
from deqlm.infra.runtime import autocast_context, pick_device, seed_everything, set_threads
from deqlm.models import build_model, count_params
from deqlm.models.weights import WeightsMismatch, load_weights
from deqlm.train import checkpoint as ckpt_lib
from deqlm.train.optim import build_optimizer, build_scheduler, clip_grad_norm, optimizer_state_bytes
from deqlm.train.signals import Stopped, StopRequest


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the step and the solver residuals."""


def _compile_cells(model: torch.nn.Module) -> None:
    """torch.compile the cells only: the solvers stay eager."""
    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[-1] == "cell" or (len(parts) > 1 and parts[-2] == "cells"):
            module.compile()


class Trainer:
    """Builds everything a run needs from the config (or a run directory to resume) and trains it."""

    def __init__(self, cfg: ExperimentConfig, *, resume_dir: str | os.PathLike | None = None,
                 stream=None):
        t = cfg.train
        self.cfg = cfg
        self._is_lm = cfg.model.n_classes == 0  # False: a position classifier (copy memory)
        self.eval_settings = resolve_eval_settings(cfg)
        self.dist = dist_lib.init_distributed(t.device)
        self.folder = self._claim_folder(resume_dir)  # before anything is built: one writer, a usable folder
        self.run_dir = self.folder.path
        try:
            self._build(resume_dir, stream)
        except BaseException:
            if resume_dir is None and self.dist.is_main:
                self.folder.discard_if_unused()
            self.folder.release()
            raise

    def _claim_folder(self, resume_dir: str | os.PathLike | None) -> RunFolder:
        """The run folder, made (a new run) and held by the main rank, its writes tried, before the model is
        built: a second trainer, or an output folder that cannot take a file, stops the run at once."""
        held = None
        if self.dist.is_main:
            cfg = self.cfg
            held = RunFolder(resume_dir or make_run_dir(cfg.train.run_dir, cfg.data.dataset, cfg.name))
            try:
                held.claim()
            except RunError:
                if resume_dir is None:
                    held.discard_if_unused()
                raise
        path = dist_lib.broadcast_object(None if held is None else str(held.path), self.dist)
        return held if held is not None else RunFolder(path)

    def _build(self, resume_dir: str | os.PathLike | None, stream) -> None:
        t, cfg = self.cfg.train, self.cfg
        state = None
        if resume_dir is not None:  # read first: a damaged or finished run must be left as it was
            state = ckpt_lib.open_for_resume(self.folder, t.max_steps, self.dist.is_main, stream)
        set_threads(t.threads)
        self.device = pick_device(t.device, self.dist.local_rank)
        self.amp = t.amp if self.device.type == "cuda" else "none"
        seed_everything(t.seed)

        self.dataset = build_dataset(cfg.data)
        self.model = build_model(cfg.model, cfg.deq, vocab_size=self.dataset.vocab_size).to(self.device)
        self.n_params = count_params(self.model)
        if t.compile:
            _compile_cells(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.net = dist_lib.wrap_model(self.model, self.dist, self.device, t.grad_sync)

        self.local_bs = cfg.data.batch_size // self.dist.world_size
        dist_lib.column_slice(cfg.data.batch_size, self.dist)  # raises when the batch does not divide
        self.train_iter = self.dataset.train_iterator(cfg.data.batch_size, cfg.data.tgt_len,
                                                      rank=self.dist.rank, world_size=self.dist.world_size)
        self.mems = self.model.init_mems(self.local_bs)
        # dropout masks differ per rank (as separate GPUs would draw them); rank 0 keeps the plain seed
        seed_everything(t.seed + 1000 * self.dist.rank)

        self.step = 0
        self.tokens = 0
        self.elapsed_s = 0.0
        self.skipped = 0
        self.best_valid_ppl = math.inf
        self.wandb_id = None
        self.window: dict | None = None  # sums over the steps since the last train log event
        self.bad_run = 0  # non-finite steps in a row
        self._open_run_dir(resume_dir, state, stream)

    def _open_run_dir(self, resume_dir: str | os.PathLike | None, state: dict | None, stream) -> None:
        """The resumed run's checkpoint state restored; then the run folder's files and the logger."""
        cfg = self.cfg
        if resume_dir is not None:
            self._restore(state)
        if self.dist.is_main:
            # first: a damaged log (deqlm.infra.io.JsonlError) must stop a resume before anything is written
            self.folder.truncate_metrics(self.step)
            self.folder.write_config(cfg)
            info, patch = env_record(self.device, self.dist.world_size)
            self.folder.write_env(info, patch, resume_step=None if resume_dir is None else self.step)
        self.logger = MetricLogger(self.folder, wandb_mode=cfg.log.wandb_mode,
                                   wandb_project=cfg.log.wandb_project, run_name=cfg.name,
                                   config=to_dict(cfg), progress=cfg.log.progress,
                                   total_steps=cfg.train.max_steps, start_step=self.step,
                                   enabled=self.dist.is_main, stream=stream)
        self.wandb_id = self.logger.wandb_id or self.wandb_id
        self.mem_meter = MemoryMeter(self.device)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def _state(self) -> dict:
        """The checkpoint dict; a collective under DDP (every rank's mems, data position, RNG gathered)."""
        mine = {"rng": ckpt_lib.rng_state(), "data_state": ckpt_lib.to_cpu(self.train_iter.state_dict()),
                "mems": ckpt_lib.to_cpu(self.mems), "window": self.window, "bad_run": self.bad_run}
        ranks = [mine]
        if self.dist.enabled:
            ranks = [None] * self.dist.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "data_state": mine["data_state"],
            "rng": mine["rng"],
            "mems": mine["mems"],
            "ranks": ranks,
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
            "vocab_hash": self.dataset.vocab_hash,
            "best_valid_ppl": self.best_valid_ppl,
            "wandb_id": self.wandb_id,
            "train_state": {"tokens": self.tokens, "elapsed_s": self.elapsed_s,
                            "skipped_steps": self.skipped},
        }

    def _restore(self, state: dict) -> None:
        if state.get("vocab_hash") != self.dataset.vocab_hash:
            raise ConfigError(f"checkpoint vocab_hash {state.get('vocab_hash')!r} does not match the data's "
                              f"{self.dataset.vocab_hash!r}")
        saved_optim = state.get("config", {}).get("optim", {}).get("name", self.cfg.optim.name)
        if saved_optim != self.cfg.optim.name:
            raise ConfigError(f"optim.name={self.cfg.optim.name!r} on resume, but the checkpoint's optimizer "
                              f"is {saved_optim!r}: its state cannot carry over")
        try:
            load_weights(self.model, state["model"])
        except WeightsMismatch as exc:
            changed = changed_settings(state.get("config", {}), self.cfg, "model")
            because = f"changed on resume: {', '.join(changed)}; " if changed else ""
            raise ConfigError(f"the checkpoint does not fit the configured model ({because}{exc})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optim_config()
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_valid_ppl = float(state["best_valid_ppl"])
        self.wandb_id = state.get("wandb_id")
        ts = state.get("train_state", {})
        self.tokens, self.elapsed_s = int(ts.get("tokens", 0)), float(ts.get("elapsed_s", 0.0))
        self.skipped = int(ts.get("skipped_steps", 0))
        ranks = state.get("ranks") or [state]
        mine = ranks[self.dist.rank] if state.get("world_size", 1) == self.dist.world_size else None
        if mine is None:  # another world size: positions and memories are not transferable, restart them
            self.train_iter.load_state_dict(state["data_state"])
            return
        self.train_iter.load_state_dict(mine["data_state"])
        self.mems = ckpt_lib.to_device(mine["mems"], self.device)
        ckpt_lib.set_rng_state(mine["rng"])
        self.window, self.bad_run = mine.get("window"), int(mine.get("bad_run", 0))

    def _apply_optim_config(self) -> None:
        """On resume the config's optimizer settings win over those stored with the optimizer state (its
        moments are kept): `optim.lr`, `weight_decay` and `betas` given as overrides take effect from the next
        step, like the schedule and `clip`, which are rebuilt from the config anyway. Unchanged settings give
        exactly the stored values (the same expression LambdaLR evaluates)."""
        o = self.cfg.optim
        mult = self.scheduler.lr_lambdas[0]
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["weight_decay"] = o.lr, o.weight_decay
            group["lr"] = o.lr * mult(self.scheduler.last_epoch)
            if "betas" in group:
                group["betas"] = tuple(o.betas)

    def save(self, names: list[str]) -> None:
        if not names:
            return
        state = self._state()
        if self.dist.is_main:
            for name in names:
                try:
                    self.folder.save_checkpoint(name, state)
                except OSError as exc:  # a full disk or a file-size limit: the temp is gone, the old kept
                    raise WriteFailed(self.folder.ckpt_dir, f"cannot write {name} ({exc.strerror}); the last "
                                   "checkpoint written whole is kept; free space, then resume") from None
        dist_lib.barrier(self.dist)

    # ------------------------------------------------------------------------------------------------------
    # one step

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x_BL, y_BL = next(self.train_iter)
        return x_BL.to(self.device, non_blocking=True), y_BL.to(self.device, non_blocking=True)

    def train_step(self, measure_activation: bool) -> dict:
        """One optimizer step (or a skipped one). Returns the step's local figures.

        With `data.seq_splits` = S > 1 (the official DEQ-TrellisNet's WT103 recipe) the segment is trained as
        S consecutive subsequences, each with its own forward and backward, the memory passed on between them
        (detached, so gradients stop at their borders) and the gradients summed into one update; each loss
        is weighted by its share of the segment's tokens. Only one subsequence's activations are held at a
        time, and `activation_bytes` is the largest of them."""
        x_BL, y_BL = self._next_batch()
        if not getattr(self.dataset, "carry_mems", True):
            self.mems = self.model.init_mems(x_BL.shape[0])
        self.net.train()
        S = self.cfg.data.seq_splits
        parts = list(zip(x_BL.tensor_split(S, dim=1), y_BL.tensor_split(S, dim=1)))
        mems, loss_value, nll_sum, n_tokens, act = self.mems, 0.0, 0.0, 0, 0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bad, grad_norm = False, None
        for i, (x_Bl, y_Bl) in enumerate(parts):
            # DDP reduces gradients once, in the last subsequence's backward
            last = i == len(parts) - 1
            ddp_defer = not last and hasattr(self.net, "no_sync")
            sync = self.net.no_sync() if ddp_defer else contextlib.nullcontext()
            with sync:
                with SavedTensorMeter(exclude=self.params, enabled=measure_activation) as meter, \
                        autocast_context(self.amp, self.device):
                    out = self.net(x_Bl, y_Bl, mems, step=self.step)
                add_solver_stats(out.stats, sums, counts)
                loss = out.loss.float() * (x_Bl.shape[1] / x_BL.shape[1])
                part_loss = float(loss.detach())
                bad = dist_lib.any_flag(not math.isfinite(part_loss), self.dist, self.device)
                if bad:
                    loss_value = part_loss  # what the log and the divergence message report
                    break
                self.scaler.scale(loss).backward()
            loss_value += part_loss
            nll_sum += float(out.nll_sum)
            n_tokens += int(out.n_tokens)
            act = max(act, meter.bytes)
            mems = out.mems
        if not bad:
            if self.dist.enabled and self.cfg.train.grad_sync == "allreduce":
                dist_lib.allreduce_grads(self.model, self.dist)
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(clip_grad_norm(self.params, self.cfg.optim.clip))
            bad = not math.isfinite(grad_norm)  # grads are synced, so every rank agrees
        if bad:
            if self.scaler.is_enabled() and grad_norm is not None:
                self.scaler.update()  # lets fp16 lower its scale after an overflow
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.mems = mems
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # the last forward's stats (the failing one's on a bad step), solver figures averaged over the parts
        stats = {**(out.stats or {}), **{k: sums[k] / counts[k] for k in sums}}
        return {"bad": bad, "loss": loss_value, "grad_norm": grad_norm, "nll_sum": nll_sum,
                "n_tokens": n_tokens, "stats": stats, "activation_bytes": act if measure_activation else None}

    # ------------------------------------------------------------------------------------------------------
    # the loop

    def _new_window(self) -> dict:
        self.mem_meter.reset()
        return {"loss": 0.0, "nll": 0.0, "ntok": 0, "steps": 0, "gnorm": 0.0, "time": 0.0, "bad": 0,
                "sums": {}, "counts": {}, "act": None}

    def _state_bytes(self) -> int:
        """Parameters, their gradients and the optimizer's state: with the activations saved for backward, the
        memory the model's own tensors take (on a CPU, process RSS is mostly the interpreter's)."""
        weights = sum(p.numel() * p.element_size() for p in self.params)
        # each gradient is as large as its parameter (between steps they are freed, so count, don't look)
        return 2 * weights + optimizer_state_bytes(self.optimizer)

    def _log_train(self, w: dict, mode: str) -> None:
        n = max(w["steps"], 1)
        vals = dist_lib.all_reduce_sum([w["loss"] / n, w["nll"], float(w["ntok"])], self.dist, self.device)
        loss = vals[0] / self.dist.world_size
        solver = dist_lib.all_reduce_mean_dict(solver_means(w["sums"], w["counts"]), self.dist, self.device)
        ntok_global = vals[2]
        self.logger.log({
            "step": self.step,
            "mode": mode,
            "train/loss": loss if w["steps"] else None,
            # a position classifier (copy memory) has a loss, not a perplexity
            "train/ppl": math.exp(min(vals[1] / vals[2], 700.0)) if vals[2] and self._is_lm else None,
            "train/tokens": self.tokens,
            "train/skipped_steps": self.skipped,
            "optim/lr": self.optimizer.param_groups[0]["lr"],
            "optim/grad_norm": w["gnorm"] / n if w["steps"] else None,
            "speed/tokens_per_s": ntok_global / max(w["time"], 1e-9),
            "speed/step_ms": 1000.0 * w["time"] / max(w["steps"] + w["bad"], 1),
            "mem/peak_gib": self.mem_meter.peak_gib(),
            "mem/peak_kind": self.mem_meter.kind,
            "mem/activation_bytes": w["act"],
            "mem/state_bytes": self._state_bytes(),
            **{f"solver/{k}": v for k, v in solver.items()},
            "time/elapsed_s": self.elapsed_s,
        })

    def validate(self) -> dict:
        s = self.eval_settings
        res = evaluate(self.model, self.dataset, "valid", s, self.step, self.device,
                       max_tokens=self.cfg.train.eval_max_tokens, amp=self.amp, dist=self.dist)
        mode = self.model.mode(self.step)
        event = {"step": self.step, "mode": mode, "valid/loss": res["loss"],
                 "valid/ppl": res["ppl"] if self._is_lm else None, "valid/tokens": res["n_tokens"],
                 "valid/tgt_len": s.tgt_len, "valid/mem_len": s.mem_len,
                 "valid/f_max_iter": s.f_max_iter if mode == "deq" else None,
                 "valid/tokens_per_s": res["tokens_per_s"],
                 **{f"valid/{k}": res[k] for k in SOLVER_KEYS if k in res},
                 "train/tokens": self.tokens, "time/elapsed_s": self.elapsed_s}
        self.logger.log(event)
        return res

    def _fail(self, step_out: dict, bad_run: int) -> None:
        s = step_out["stats"]
        keys = ("f_abs_res", "f_rel_res", "b_rel_res")
        res = ", ".join(f"{k} {s[k]:.3g}" for k in keys if s.get(k) is not None)
        raise TrainingDiverged(
            f"step {self.step}: {bad_run} non-finite steps in a row (loss {step_out['loss']}, grad_norm "
            f"{step_out['grad_norm']}; solver residuals: {res or 'none (no solver in this mode)'}); "
            f"last good checkpoint in {self.folder.ckpt_dir}")

    def fit(self) -> dict:
        """Train to `train.max_steps`; returns the last validation result."""
        t = self.cfg.train
        last_valid: dict = {}
        if self.window is None:  # a resumed run goes on with the window its checkpoint was taken in
            self.window = self._new_window()
        stop = StopRequest().install()
        try:
            while self.step < t.max_steps:
                self.step += 1
                # measured on the step that is logged, so the figure belongs to the event's mode
                measure = self.step % t.log_every == 0 or self.step == t.max_steps
                t0 = time.perf_counter()
                out = self.train_step(measure_activation=measure)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.elapsed_s += dt
                window = self.window
                window["time"] += dt
                if measure:
                    window["act"] = out["activation_bytes"]
                if out["bad"]:
                    self.skipped += 1
                    self.bad_run += 1
                    window["bad"] += 1
                    self.logger.write(f"step {self.step}: non-finite loss/gradient, update skipped "
                                      f"({self.bad_run} in a row)")
                    if self.bad_run >= t.max_bad_steps:
                        self._fail(out, self.bad_run)
                else:
                    self.bad_run = 0
                    self.tokens += out["n_tokens"] * self.dist.world_size
                    window["loss"] += out["loss"]
                    window["nll"] += out["nll_sum"]
                    window["ntok"] += out["n_tokens"]
                    window["gnorm"] += out["grad_norm"]
                    window["steps"] += 1
                    add_solver_stats(out["stats"], window["sums"], window["counts"])
                last = self.step == t.max_steps
                if self.step % t.log_every == 0 or last:
                    self._log_train(window, self.model.mode(self.step))
                    self.window = self._new_window()
                # every rank must agree, or the ranks that stop would wait forever in the others' collectives
                stopping = dist_lib.any_flag(stop.signum is not None, self.dist, self.device)
                last_valid = self._validate_and_save(last, stopping) or last_valid
                if stopping and not last:
                    raise Stopped(stop.signum, self.step, self.folder)
        finally:
            stop.restore()
            self.logger.close()
            self.folder.release()
        return last_valid

    def _validate_and_save(self, last: bool, stopping: bool) -> dict | None:
        """Validation and checkpoints due after this step (a stop request adds the last checkpoint); None: no
        validation was due."""
        t = self.cfg.train
        names, valid = [], None
        t1 = time.perf_counter()
        if (t.eval_every and self.step % t.eval_every == 0) or last:
            valid = self.validate()
            if valid["ppl"] < self.best_valid_ppl:
                self.best_valid_ppl = valid["ppl"]
                names.append(BEST)
        if (t.ckpt_every and self.step % t.ckpt_every == 0) or last or stopping:
            names.append(LAST)  # after the best: the last checkpoint's best figure is then always on disk
        self.elapsed_s += time.perf_counter() - t1
        self.save(names)
        return valid


def train(cfg: ExperimentConfig, *, resume_dir: str | os.PathLike | None = None, stream=None) -> Trainer:
    """Build a Trainer, print `run_dir: PATH`, train; returns the trainer (run_dir, model, counters)."""
    trainer = Trainer(cfg, resume_dir=resume_dir, stream=stream)
    if trainer.dist.is_main:
        trainer.logger.write(f"run_dir: {trainer.run_dir}")
        params = ", ".join(f"{k} {v:,}" for k, v in trainer.n_params.items())
        trainer.logger.write(f"{cfg.name}: {params}; device {trainer.device}, "
                             f"world size {trainer.dist.world_size}")
        trainer.logger.write(allocator_summary_line())
        if trainer.logger.wandb_note:
            trainer.logger.write(trainer.logger.wandb_note)
        m, steps = cfg.model, cfg.train.max_steps
        if m.core == "deq" and steps <= m.pretrain_steps:  # mode(step) is "pretrain" up to pretrain_steps
            trainer.logger.write(
                f"note: train.max_steps={steps} <= model.pretrain_steps={m.pretrain_steps}: each step trains "
                f"the {m.pretrain_depth}-layer unrolled pretraining stack and the DEQ solver never runs; "
                f"reports label this run pretrain only (raise train.max_steps or lower model.pretrain_steps)")
    trainer.fit()
    return trainer
