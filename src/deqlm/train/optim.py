"""Optimizers, learning-rate schedules and gradient clipping (config: `optim.*`).

Schedules are multipliers of `optim.lr` as a function of the optimizer step s (0-based, as LambdaLR counts):
    cosine:   (s + 1) / warmup during warm-up, then min_lr/lr + (1 - min_lr/lr) * (1 + cos(pi * t)) / 2,
              t = (s - warmup) / (max_steps - warmup)        (official DEQ/Transformer-XL recipe)
    constant: (s + 1) / warmup during warm-up, then 1
    step:     (s + 1) / warmup during warm-up, then 10**-k, k = #(optim.decay_steps <= s)  (TrellisNet recipe)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from deqlm.choices import OptimizerName, Schedule, values
from deqlm.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is not one of {', '.join(values(OptimizerName))}")


def lr_multiplier(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The schedule as a pure function of the step (easy to plot and test)."""
    warmup = max(0, cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    decay_steps = sorted(cfg.decay_steps)

    def warm(s: int) -> float | None:
        return (s + 1) / warmup if s < warmup else None

    if cfg.schedule == "cosine":
        def f(s: int) -> float:
            w = warm(s)
            if w is not None:
                return w
            t = min(1.0, (s - warmup) / max(1, max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif cfg.schedule == "constant":
        def f(s: int) -> float:
            w = warm(s)
            return 1.0 if w is None else w
    elif cfg.schedule == "step":
        def f(s: int) -> float:
            w = warm(s)
            return w if w is not None else 0.1 ** sum(1 for d in decay_steps if s >= d)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of {', '.join(values(Schedule))}")
    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, max_steps))


def clip_grad_norm(params: Iterable[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """Total gradient 2-norm before clipping; clips to `clip` when clip > 0 (non-finite norms returned)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    max_norm = clip if clip > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (Adam: both moments and its step counter)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))
