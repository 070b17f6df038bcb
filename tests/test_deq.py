"""Claims about deqlm.deq: implicit gradients, O(1) memory in solver steps, stats, eval, Jacobian tools."""

import pytest
import torch

from deqlm.config import DEQConfig
from deqlm.deq import DEQFixedPoint, jac_reg_loss, spectral_radius, spectral_reg_loss

B, N, D = 3, 6, 4


def _params(dtype=torch.float64):
    W = torch.randn(N, N, dtype=dtype)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    U = torch.randn(N, D, dtype=dtype, requires_grad=True)
    c = torch.randn(N, dtype=dtype, requires_grad=True)
    x = torch.randn(B, D, dtype=dtype, requires_grad=True)
    return W, U, c, x


def _closure(W, U, c, x):
    u_BN = x @ U.T + c  # the injected input, computed once per forward
    return lambda z_BN: torch.tanh(z_BN @ W.T + u_BN)


def _tight_deq(**kw):
    base = dict(f_tol=1e-13, b_tol=1e-13, f_max_iter=200, b_max_iter=200, stop_mode="abs")
    return DEQFixedPoint(**{**base, **kw})


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_implicit_grad_matches_grad_of_f_iterated_to_convergence(solver):
    W, U, c, x = _params()
    probe = torch.randn(B, N, dtype=torch.float64)
    deq = _tight_deq(f_solver=solver, b_solver=solver)
    z_star, _ = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64))
    implicit = torch.autograd.grad((z_star * probe).sum(), (W, U, c, x))
    f = _closure(W, U, c, x)
    z = torch.zeros(B, N, dtype=torch.float64)
    for _ in range(120):  # 0.5^120: converged to machine precision, ordinary backprop through every step
        z = f(z)
    unrolled = torch.autograd.grad((z * probe).sum(), (W, U, c, x))
    for a, b in zip(implicit, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_implicit_layer_passes_gradcheck():
    deq = _tight_deq()

    def run(W, U, c, x):
        z_star, _ = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64))
        return z_star

    assert torch.autograd.gradcheck(run, _params(), eps=1e-6, atol=1e-6)


def test_implicit_backward_refuses_create_graph_rather_than_return_a_wrong_second_derivative():
    W, U, c, x = _params()
    z_star, _ = _tight_deq()(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(z_star.square().sum(), W, create_graph=True)


def test_implicit_grad_of_an_f_that_ignores_z_is_the_plain_gradient():
    W, U, c, x = _params()
    z0 = torch.zeros(B, N, dtype=torch.float64)
    z_star, _ = _tight_deq()(lambda z: torch.tanh(x @ U.T + c), z0)
    (implicit,) = torch.autograd.grad(z_star.square().sum(), U)
    (direct,) = torch.autograd.grad(torch.tanh(x @ U.T + c).square().sum(), U)
    torch.testing.assert_close(implicit, direct)


def test_phantom_grad_with_many_steps_approaches_implicit_grad():
    W, U, c, x = _params()
    grads = {}
    for grad in ("implicit", 60):
        deq = _tight_deq(grad=grad)
        z_star, _ = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64))
        grads[grad] = torch.autograd.grad(z_star.sum(), (W, x))
    for a, b in zip(grads["implicit"], grads[60]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _saved_bytes(f_max_iter: int, grad="implicit") -> int:
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(4, 8, 32)
    deq = DEQFixedPoint(f_max_iter=f_max_iter, f_tol=1e-12, grad=grad)
    f = lambda z: torch.tanh(lin(z) + x)  # noqa: E731
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z_star, stats = deq(f, torch.zeros(4, 8, 32))
        loss = z_star.square().mean()
    assert stats["f_nstep"] == f_max_iter  # tol unreachable: every allowed step is taken
    loss.backward()
    return total[0]


def test_saved_bytes_for_backward_do_not_grow_with_forward_steps():
    assert _saved_bytes(5) == _saved_bytes(40) > 0


def test_phantom_grad_stores_k_applications():
    assert _saved_bytes(5, grad=3) == _saved_bytes(40, grad=3) > _saved_bytes(5, grad=1)


def test_stats_are_floats_and_backward_fills_b_stats_in_the_same_dict():
    W, U, c, x = _params()
    deq = DEQFixedPoint(f_max_iter=20, b_max_iter=25)
    z_star, stats = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64))
    for key in ("f_nstep", "f_abs_res", "f_rel_res", "converged_frac"):
        assert isinstance(stats[key], float)
    assert "b_nstep" not in stats
    z_star.sum().backward()
    for key in ("b_nstep", "b_abs_res", "b_rel_res"):
        assert isinstance(stats[key], float)
    assert W.grad is not None and x.grad is not None


def test_the_layer_keeps_its_one_cap_in_eval_mode_and_a_call_can_set_its_own_without_a_graph():
    W, U, c, x = _params()
    deq = DEQFixedPoint(f_max_iter=5, f_tol=1e-14).eval()
    z_star, stats = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64))
    assert stats["f_nstep"] == 5.0  # its training cap: an evaluation cap is the eval settings' to pass in
    deq.f_max_iter = 30
    deq.train()
    with torch.no_grad():
        z_star, stats = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64), max_iter=3)
    assert stats["f_nstep"] == 3.0 and not z_star.requires_grad
    # one call's own cap and tolerance win over the layer's and leave it as it was
    with torch.no_grad():
        _, stats = deq(_closure(W, U, c, x), torch.zeros(B, N, dtype=torch.float64), max_iter=30, tol=1e-2)
    assert stats["f_nstep"] < 30
    assert (deq.f_max_iter, deq.f_tol) == (30, 1e-14)


def test_module_has_no_parameters_and_follows_eval():
    model = torch.nn.Sequential()
    model.deq = DEQFixedPoint()
    assert list(model.parameters()) == []
    model.eval()
    assert not model.deq.training


def test_from_config_reads_deq_config():
    cfg = DEQConfig(
        f_solver="anderson",
        b_solver="fixed_point",
        grad="3",
        anderson_m=4,
        broyden_rank=7,
        f_max_iter=12,
    )
    deq = DEQFixedPoint.from_config(cfg)
    assert deq.grad == 3 and deq.f_solver == "anderson" and deq.f_max_iter == 12
    assert deq.solver_kwargs["anderson"]["m"] == 4 and deq.solver_kwargs["broyden"]["rank"] == 7


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="valid solvers"):
        DEQFixedPoint(f_solver="newton")
    with pytest.raises(ValueError, match="grad"):
        DEQFixedPoint(grad="0")
    with pytest.raises(ValueError, match="solver_kwargs"):
        DEQFixedPoint(solver_kwargs={"newton": {}})


def test_training_under_autocast_runs_and_gives_float32_grads():
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    deq = DEQFixedPoint(f_max_iter=10, b_max_iter=10, f_tol=1e-2, b_tol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_star, stats = deq(lambda z: torch.tanh(lin(z)), torch.zeros(2, 16))
        loss = z_star.float().square().mean()
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all() and "b_nstep" in stats


def test_jac_reg_loss_is_unbiased_and_differentiable():
    A = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(200, 5, dtype=torch.float64, requires_grad=True)
    f_z = z @ A.T
    est = jac_reg_loss(f_z, z, n_samples=20)
    exact = A.detach().square().sum() / 5  # ||J||_F^2 = B ||A||_F^2, numel = B * 5
    torch.testing.assert_close(est.detach(), exact, rtol=0.05, atol=0)
    (gA,) = torch.autograd.grad(est, A)
    torch.testing.assert_close(gA, 2 * A.detach() / 5, rtol=0.1, atol=0.05)


def test_spectral_radius_of_a_linear_map():
    Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([0.9, -0.5, 0.3, 0.2, 0.1, 0.0, -0.1, 0.05], dtype=torch.float64)) @ Q.T
    z = torch.randn(3, 8, dtype=torch.float64)
    rho = spectral_radius(lambda v: v @ A.T, z, n_iter=100)
    assert abs(rho - 0.9) < 1e-3
    assert spectral_radius(lambda v: v @ A.T, z, n_iter=100, per_sample=True).shape == (3,)


def test_spectral_penalty_is_the_squared_radius_and_moves_the_dominant_eigenvalue_only():
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    eig = torch.tensor([0.8, 0.4, -0.3, 0.2, 0.1, 0.05], dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    A = Q @ torch.diag(eig) @ Q.T  # symmetric: power iteration on J^T finds the same direction
    penalty = spectral_reg_loss(z @ A.T, z, n_iter=60)
    torch.testing.assert_close(penalty.detach(), torch.tensor(0.64, dtype=torch.float64), rtol=1e-6, atol=0)
    (g_eig,) = torch.autograd.grad(penalty, eig)
    torch.testing.assert_close(g_eig, torch.tensor([1.6, 0, 0, 0, 0, 0], dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)  # d(rho^2)/d lambda_max = 2 rho; the rest untouched


def test_spectral_penalty_refuses_zero_power_iterations():
    z = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="n_iter"):
        spectral_reg_loss(z * 2, z, n_iter=0)
