"""Learning-rate schedules and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

from deqlm.config import OptimConfig
from deqlm.train.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_multiplier


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    f = lr_multiplier(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr=0.1), max_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_step_schedule_divides_by_ten_at_each_decay_step():
    f = lr_multiplier(OptimConfig(lr=1.0, schedule="step", decay_steps=[5, 8]), max_steps=10)
    assert [f(s) for s in (0, 4, 5, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_constant_schedule_and_the_scheduler_drive_the_optimizer_lr():
    cfg = OptimConfig(name="sgd", lr=0.5, schedule="constant", warmup_steps=2)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    sched = build_scheduler(opt, cfg, max_steps=10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.5, 0.5]


def test_clip_returns_the_norm_before_clipping_and_clips():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert float(clip_grad_norm([p], 1.0)) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([math.nan, 0.0])
    assert not math.isfinite(float(clip_grad_norm([p], 1.0)))


def test_unknown_optimizer_is_a_value_error_naming_the_key():
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name="lion"))
