"""The reversible DEQ (deq.f_solver=reversible, deq.grad=reversible): exact gradients, flat memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _model_helpers import VOCAB, tiny_model
from deqlm.config import ConfigError, load_config
from deqlm.deq import DEQFixedPoint
from deqlm.infra.memory import peak_live_bytes
from deqlm.solvers import reversible

REV = ["deq.f_solver=reversible", "deq.grad=reversible"]
STEPS, BETA = 6, 0.5


class UnrolledReversible(nn.Module):
    """The same iteration as the reversible solver, every step recorded by autograd: the reference."""

    def __init__(self, steps: int, beta: float):
        super().__init__()
        self.steps, self.beta = steps, beta

    def forward(self, f, z0, ctx=None, *, weights=(), **_):
        y = z = z0
        for _ in range(self.steps):
            y = (1 - self.beta) * y + self.beta * f(z, ctx)
            z = (1 - self.beta) * z + self.beta * f(y, ctx)
        return z, {}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (3, 7), generator=g) for _ in range(3)]


def _grads(model, reference: bool):
    """Parameter gradients of one training segment, with a memory built by a first segment."""
    if reference:
        model.core.deq = UnrolledReversible(STEPS, BETA)
    model.train()
    x0, x1, y1 = _batch()
    with torch.no_grad():
        mems = model(x0, x1).mems
    torch.manual_seed(7)  # the same DropConnect masks in both runs
    out = model(x1, y1, mems)
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


ARCH_SETTINGS = {
    "transformer": ["model.input_path=residual", "model.init_std=0.25"],
    "trellisnet": ["model.wdrop=0.2"],
}


@pytest.mark.parametrize("arch", ["transformer", "trellisnet"])
def test_reversible_gradient_is_autograd_through_the_same_iteration_in_float64(arch):
    overrides = [*REV, f"deq.f_max_iter={STEPS}", "deq.f_tol=0", f"deq.reversible_beta={BETA}",
                 *ARCH_SETTINGS[arch]]
    out, got = _grads(tiny_model(arch, *overrides).double(), reference=False)
    _, want = _grads(tiny_model(arch, *overrides).double(), reference=True)
    assert out.stats["f_nstep"] == STEPS and out.stats["f_evals"] == 2 * STEPS + 1
    assert set(got) == set(want)
    assert any(n.startswith("embed") for n in got)  # through the injection to the embedding
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-300)
        assert err < 1e-8, (name, float(err))
    assert out.stats["rev_recon_err"] < 1e-10


def test_a_float64_model_computes_its_loss_in_float64():
    for arch in ("transformer", "trellisnet"):
        model = tiny_model(arch, *REV).double()
        x, y = _batch()[:2]
        assert model(x, y).loss.dtype == torch.float64


def _step_peak(steps: int, grad: str) -> int:
    overrides = [f"deq.f_max_iter={steps}", "deq.f_tol=0"]
    overrides += REV if grad == "reversible" else [f"deq.grad={grad}"]
    model = tiny_model("transformer", *overrides, "model.d_model=32", "model.d_inner=64")
    x, y = _batch()[:2]

    def step():
        model(x, y).loss.backward()

    step()  # a priming step: lazily allocated buffers are not part of the step
    return peak_live_bytes(step)


def test_reversible_training_step_memory_does_not_grow_with_the_number_of_steps():
    rev4, rev32 = _step_peak(4, "reversible"), _step_peak(32, "reversible")
    unrolled32 = _step_peak(32, "64")  # 64 recorded applications of f: what storing the steps would cost
    assert rev32 <= 1.1 * rev4, (rev4, rev32)
    assert unrolled32 > 3 * rev32, (rev32, unrolled32)  # the measurement does see stored steps


def test_float32_states_lose_what_float64_states_keep():
    """The reversal amplifies rounding by 1/|1 - beta| per step: the reconstruction error is reported, and
    the state dtype decides it."""
    errors = {}
    for dtype in ("float64", "float32"):
        model = tiny_model("transformer", *REV, "deq.f_max_iter=12", "deq.f_tol=0",
                           f"deq.reversible_dtype={dtype}", "deq.reversible_beta=0.5")
        x, y = _batch()[:2]
        out = model(x, y)
        out.loss.backward()
        errors[dtype] = out.stats["rev_recon_err"]
    assert errors["float64"] < errors["float32"]
    assert errors["float64"] < 1e-6


def test_the_reversible_solver_alone_converges_on_a_contraction():
    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(3, 5, dtype=torch.float64)
    res = reversible(lambda z: z @ A.T + b, torch.zeros(3, 5, dtype=torch.float64), max_iter=60, tol=1e-10)
    exact = torch.linalg.solve(torch.eye(5, dtype=torch.float64) - A, b.T).T
    assert res.converged and res.f_evals == 2 * res.nstep + 1
    assert torch.allclose(res.z, exact, atol=1e-8)


@pytest.mark.parametrize(
    "overrides, word",
    [
        (["deq.f_solver=reversible"], "deq.grad=implicit"),
        (["deq.grad=reversible"], "deq.f_solver=broyden"),
        ([*REV, "deq.reversible_beta=1.0"], "deq.reversible_beta=1.0"),
        ([*REV, "deq.reversible_beta=2.5"], "deq.reversible_beta=2.5"),
    ],
)
def test_a_bad_reversible_setting_is_a_one_line_config_error(overrides, word):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert word in str(info.value) and "\n" not in str(info.value)


def test_the_layer_refuses_half_a_reversible_pair():
    with pytest.raises(ValueError, match="go together"):
        DEQFixedPoint(f_solver="reversible", grad="implicit")
