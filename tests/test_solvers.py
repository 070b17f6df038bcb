"""Claims about deqlm.solvers: correctness, acceleration, per-sample stopping, robustness, precision."""

import pytest
import torch

from deqlm.solvers import SOLVERS, anderson, broyden, fixed_point, get_solver

ALL = [broyden, anderson, fixed_point]


def _contraction(B=4, n=16, scale=0.6, dtype=torch.float64):
    W_BNN = torch.randn(B, n, n, dtype=dtype)
    W_BNN = scale * W_BNN / torch.linalg.matrix_norm(W_BNN, 2)[:, None, None]
    b_BN = torch.randn(B, n, dtype=dtype)
    return lambda z: torch.tanh(torch.einsum("bij,bj->bi", W_BNN, z) + b_BN)


def _ill_conditioned_linear(B=4, n=64, dtype=torch.float64):
    """f(z) = A z + b, A symmetric, eigenvalues spread over [0, 0.98]: plain iteration contracts slowly."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype))
    A = Q @ torch.diag(torch.linspace(0.0, 0.98, n, dtype=dtype)) @ Q.T
    b_BN = torch.randn(B, n, dtype=dtype)
    return lambda z: z @ A.T + b_BN


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_every_solver_reaches_fixed_point_of_contraction_within_tol(solver, stop_mode):
    f = _contraction()
    z0 = torch.zeros(4, 16, dtype=torch.float64)
    res = solver(f, z0, max_iter=200, tol=1e-8, stop_mode=stop_mode)
    assert res.converged and bool(res.converged_B.all())
    g_B = (f(res.z) - res.z).norm(dim=1)
    per_sample = g_B / f(res.z).norm(dim=1) if stop_mode == "rel" else g_B
    assert float(per_sample.max()) <= 1e-8
    torch.testing.assert_close(res.abs_res_B, g_B)
    assert res.f_evals == res.nstep + 1
    assert res.abs_trace.shape == (res.f_evals, 4)


def test_broyden_matches_dense_good_broyden_reference():
    f = _contraction(B=3, n=12, scale=0.9)
    z = torch.zeros(3, 12, dtype=torch.float64)
    H = -torch.eye(12, dtype=torch.float64).repeat(3, 1, 1)
    g = f(z) - z
    for k in range(1, 9):
        s = -(H @ g[..., None])[..., 0]
        z = z + s
        g_new = f(z) - z
        y = g_new - g
        Hy, sH = (H @ y[..., None])[..., 0], (s[:, None] @ H)[:, 0]
        H = H + (s - Hy)[:, :, None] * sH[:, None, :] / (sH * y).sum(-1)[:, None, None]
        g = g_new
        res = broyden(f, torch.zeros(3, 12, dtype=torch.float64), max_iter=k, tol=0.0, stop_mode="abs")
        torch.testing.assert_close(res.abs_trace[-1], g.norm(dim=1), rtol=1e-8, atol=1e-12)


def test_broyden_with_bounded_memory_matches_the_product_form_reference():
    """Past `rank` steps the oldest factors are dropped (treated as H_0 = -I): compare, step by step, with the
    product form H = (I + s_k s_{k-1}^T / |s_{k-1}|^2) ... (I + s_{lo+1} s_lo^T / |s_lo|^2) H_0 applied
    factor by factor, through several wraps of the circular buffer and a partly filled last chunk."""
    f = _contraction(B=3, n=20, scale=0.95)
    rank, steps_taken = 10, 25
    z = torch.zeros(3, 20, dtype=torch.float64)
    g = f(z) - z
    stored, trace = [], [g.norm(dim=1)]
    for _ in range(steps_taken):
        if not stored:
            s = g
        else:
            w = -g
            for s_old, s_next in zip(stored[:-1], stored[1:], strict=False):
                w = w + s_next * ((s_old * w).sum(1) / (s_old * s_old).sum(1))[:, None]
            s_k = stored[-1]
            s = -w / (1 + (s_k * w).sum(1) / (s_k * s_k).sum(1))[:, None]
        stored = (stored + [s])[-(rank + 1) :]
        z = z + s
        g = f(z) - z
        trace.append(g.norm(dim=1))
    res = broyden(f, torch.zeros(3, 20, dtype=torch.float64), max_iter=steps_taken, tol=0.0, stop_mode="abs",
                  rank=rank)
    torch.testing.assert_close(res.abs_trace, torch.stack(trace), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("m, beta", [(1, 0.5), (3, 0.7), (4, 1.0)])
def test_anderson_matches_a_direct_reference_of_its_update(m, beta):
    """z_new = sum_i alpha_i (f(z_i) - (1 - beta) g_i) over the last m iterates, alpha from
    (G G^T + lam_eff I) a = 1 normalised, lam_eff = lam * mean ||g_i||^2; m = 1 is damped iteration."""
    f = _contraction(B=2, n=10, scale=0.9)
    lam, steps = 1e-2, 12
    z = torch.zeros(2, 10, dtype=torch.float64)
    hist, trace = [], []
    for k in range(steps + 1):
        fz = f(z)
        g = fz - z
        trace.append(g.norm(dim=1))
        if k == steps:
            break
        hist = (hist + [(fz, g)])[-m:]
        F_BNF = torch.stack([h[0] for h in hist], 1)
        G_BNF = torch.stack([h[1] for h in hist], 1)
        gram = G_BNF @ G_BNF.mT
        reg = lam * gram.diagonal(dim1=1, dim2=2).mean(1)
        a = torch.linalg.solve(gram + reg[:, None, None] * torch.eye(len(hist), dtype=gram.dtype),
                               torch.ones(2, len(hist), 1, dtype=gram.dtype))[..., 0]
        alpha = a / a.sum(1, keepdim=True)
        z = (alpha[:, :, None] * (F_BNF - (1 - beta) * G_BNF)).sum(1)
    res = anderson(f, torch.zeros(2, 10, dtype=torch.float64), max_iter=steps, tol=0.0, stop_mode="abs", m=m,
                   beta=beta, lam=lam)
    torch.testing.assert_close(res.abs_trace, torch.stack(trace), rtol=1e-7, atol=1e-12)


def test_broyden_with_small_rank_still_converges():
    f = _ill_conditioned_linear(B=2, n=32)
    res = broyden(f, torch.zeros(2, 32, dtype=torch.float64), max_iter=300, tol=1e-8, stop_mode="rel", rank=4)
    assert res.converged


@pytest.mark.parametrize("solver", [broyden, anderson], ids=lambda s: s.__name__)
def test_quasi_newton_needs_several_times_fewer_f_evals_than_plain_iteration(solver):
    f = _ill_conditioned_linear()
    z0 = torch.zeros(4, 64, dtype=torch.float64)
    plain = fixed_point(f, z0, max_iter=5000, tol=1e-6, stop_mode="rel")
    # Broyden with full memory (rank >= n: on a linear map it then terminates within 2n steps, Gay 1979). With
    # fewer factors than the solve needs the count swings with rounding (10 factors: 150-280 evaluations here;
    # docs/solvers.md, "Choosing the rank")
    kw = {"rank": 64} if solver is broyden else {}
    fast = solver(f, z0, max_iter=5000, tol=1e-6, stop_mode="rel", **kw)
    assert plain.converged and fast.converged
    ratio = plain.f_evals / fast.f_evals
    assert ratio >= 4.0, (
        f"{solver.__name__}: {fast.f_evals} f-evals vs plain {plain.f_evals} (ratio {ratio:.1f})"
    )


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_converged_samples_are_left_untouched(solver):
    """Row 0 is an easy contraction, row 1 a slow one; after row 0 converges, f only ever sees its final z."""
    n = 8
    W = torch.randn(n, n, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2)
    scale_B1 = torch.tensor([[0.05], [0.97]], dtype=torch.float64)
    b_BN = torch.randn(2, n, dtype=torch.float64)
    seen = []

    def f(z):
        seen.append(z.clone())
        return torch.tanh(scale_B1 * (z @ W.T)) + b_BN

    res = solver(f, torch.zeros(2, n, dtype=torch.float64), max_iter=400, tol=1e-9, stop_mode="abs")
    assert res.converged
    done_at = int((res.abs_trace[:, 0] <= 1e-9).nonzero()[0])
    assert done_at < len(seen) - 5  # the hard sample kept the solver going
    for z in seen[done_at:]:
        assert torch.equal(z[0], res.z[0])
    alone = solver(
        lambda z: torch.tanh(0.05 * (z @ W.T)) + b_BN[:1],
        torch.zeros(1, n, dtype=torch.float64),
        max_iter=400,
        tol=1e-9,
        stop_mode="abs",
    )
    torch.testing.assert_close(res.z[0], alone.z[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_non_converging_problem_returns_lowest_residual_iterate_without_raising(solver):
    """f(z) = z + 1 + |z - z0|: no fixed point, and every move away from z0 makes the residual worse."""
    z0 = torch.randn(3, 5, dtype=torch.float64)
    f = lambda z: z + 1.0 + (z - z0).abs()  # noqa: E731
    res = solver(f, z0, max_iter=20, tol=1e-6, stop_mode="abs")
    assert not res.converged and not bool(res.converged_B.any())
    torch.testing.assert_close(res.z, z0)
    torch.testing.assert_close(res.abs_res_B, torch.full((3,), 5**0.5, dtype=torch.float64))


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_returned_iterate_is_each_samples_lowest_residual_one_when_residuals_rise_and_fall(solver):
    """Per sample, res.z is exactly the first iterate with the smallest residual among all f was called on,
    wherever in the run it came (the record is kept lazily, so this checks the deferred copies)."""
    gen = torch.Generator().manual_seed(3)
    B, n = 6, 10
    b_BN = torch.randn(B, n, dtype=torch.float64, generator=gen)
    seen_z, seen_res = [], []

    def f(z_BN):
        # a contraction plus noise whose size varies per call and sample: residuals rise and fall at random
        scale_B1 = torch.rand(B, 1, dtype=torch.float64, generator=gen)
        noise_BN = torch.randn(B, n, dtype=torch.float64, generator=gen)
        fz_BN = 0.5 * torch.tanh(z_BN) + b_BN + scale_B1 * noise_BN
        seen_z.append(z_BN.clone())
        seen_res.append(torch.linalg.vector_norm(fz_BN - z_BN, dim=1))
        return fz_BN

    z0 = torch.zeros(B, n, dtype=torch.float64)
    res = solver(f, z0, max_iter=12, tol=1e-12, stop_mode="abs", explode=1e9)
    res_TB = torch.stack(seen_res)
    best_B = res_TB.argmin(dim=0)  # first occurrence of the minimum
    assert len(set(best_B.tolist())) >= 3  # the best iterates come from several points of the run
    for b in range(B):
        assert torch.equal(res.z[b], seen_z[int(best_B[b])][b])
        assert float(res.abs_res_B[b]) == float(res_TB[best_B[b], b])


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_nan_producing_f_does_not_crash_and_other_samples_still_converge(solver):
    f_ok = _contraction(B=3, n=6)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = f_ok(z).clone()
        if calls[0] > 2:
            out[1] = float("nan")  # sample 1 breaks after two evaluations
        return out

    res = solver(f, torch.zeros(3, 6, dtype=torch.float64), max_iter=100, tol=1e-8, stop_mode="rel")
    assert torch.isfinite(res.z).all()
    assert res.converged_B.tolist() == [True, False, True]
    assert not res.converged


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_nan_at_z0_returns_z0(solver):
    z0 = torch.zeros(2, 4)
    res = solver(lambda z: z + float("nan"), z0, max_iter=5, tol=1e-3)
    assert torch.equal(res.z, z0) and not res.converged


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
def test_residual_explosion_stops_the_sample(solver):
    f = lambda z: 3.0 * z + 1.0  # noqa: E731  (plain iteration diverges; quasi-Newton solves it: both fine)
    res = solver(f, torch.zeros(2, 3), max_iter=50, tol=1e-5, stop_mode="abs", explode=10.0)
    assert torch.isfinite(res.z).all()
    assert res.abs_res <= float(res.abs_trace[0].norm()) + 1e-6


@pytest.mark.parametrize("solver", [broyden, anderson], ids=lambda s: s.__name__)
def test_autocast_bf16_still_solves_in_float32(solver):
    """f stays float32 under autocast (elementwise ops), so a 1e-6 solve is only reachable if the solver's own
    linear algebra (bmm, matmul: bf16 under CPU autocast) runs in float32."""
    b_BN = torch.randn(4, 32)
    seen_autocast = []

    def f(z):
        seen_autocast.append(torch.is_autocast_enabled("cpu"))
        return 0.9 * torch.tanh(z) + b_BN

    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = solver(f, torch.zeros(4, 32), max_iter=60, tol=1e-6, stop_mode="rel")
    assert res.z.dtype == torch.float32
    assert res.converged, float(res.rel_res_B.max())
    assert all(seen_autocast)  # f itself still ran under the caller's autocast


def test_autocast_with_bf16_f_returns_float32_solution():
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = broyden(lambda z: torch.tanh(lin(z)), torch.zeros(2, 16), max_iter=30, tol=3e-2)
    assert res.z.dtype == torch.float32 and res.converged


def test_solvers_accept_any_trailing_shape_and_keep_dtype():
    f = lambda z: 0.5 * torch.cos(z)  # noqa: E731
    z0 = torch.zeros(2, 3, 4)
    for name in SOLVERS:
        res = get_solver(name)(f, z0, max_iter=50, tol=1e-5)
        assert res.z.shape == z0.shape and res.z.dtype == z0.dtype and res.converged


def test_unknown_solver_name_raises_value_error_listing_names():
    with pytest.raises(ValueError, match="broyden, anderson, fixed_point"):
        get_solver("newton")


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="stop_mode"):
        broyden(lambda z: z, torch.zeros(1, 2), stop_mode="max")
    with pytest.raises(ValueError, match="m="):
        anderson(lambda z: z, torch.zeros(1, 2), m=0)
    for explode in (0.0, 0.5, float("nan")):  # below 1 the first iterate would count as exploded
        with pytest.raises(ValueError, match="explode="):
            fixed_point(lambda z: z, torch.zeros(1, 2), explode=explode)
    with pytest.raises(ValueError, match="no elements"):
        broyden(lambda z: z, torch.zeros(0, 8))


@pytest.mark.parametrize("solver", ALL, ids=lambda s: s.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_residuals_are_those_of_the_returned_z(solver, dtype):
    """f sees the iterate rounded to z0's dtype; the reported residual must be f's residual at the z returned
    (solving to a tolerance near that precision's resolution makes any mismatch visible)."""
    torch.manual_seed(0)
    W = 0.5 * torch.randn(32, 32) / 32**0.5
    b = torch.randn(4, 32)
    f = lambda z: torch.tanh(z.float() @ W.T + b).to(z.dtype)  # noqa: E731
    res = solver(f, torch.zeros(4, 32, dtype=dtype), max_iter=40, tol=1e-3)
    fz = f(res.z).float()
    rel_B = (fz - res.z.float()).norm(dim=1) / fz.norm(dim=1)
    torch.testing.assert_close(rel_B, res.rel_res_B.float(), rtol=1e-4, atol=1e-7)


def test_a_sample_never_finite_makes_batch_residuals_infinite_not_nan():
    z0 = torch.zeros(3, 4)
    nan_row = torch.tensor([True, False, False])[:, None]
    res = broyden(lambda z: torch.where(nan_row, float("nan"), 0.5 * z + 1), z0, max_iter=20, tol=1e-6)
    assert res.abs_res == float("inf") and res.rel_res == float("inf")
    assert res.converged_B.tolist() == [False, True, True]


def test_solvers_build_no_autograd_graph():
    w = torch.tensor(0.5, requires_grad=True)
    res = broyden(lambda z: w * z + 1, torch.zeros(2, 3), max_iter=5)
    assert not res.z.requires_grad


def test_max_iter_zero_evaluates_once_and_returns_z0():
    z0 = torch.ones(2, 3)
    res = anderson(lambda z: 0.5 * z, z0, max_iter=0)
    assert res.nstep == 0 and res.f_evals == 1 and torch.equal(res.z, z0)


def test_broyden_masked_path_equals_the_unmasked_one_while_no_sample_has_restarted(monkeypatch):
    """The masked step (used once some sample restarted) must reduce to the fast one when every factor is
    valid, before and after the circular buffer wraps."""
    import sys

    mod = sys.modules["deqlm.solvers.broyden"]
    f = _ill_conditioned_linear(B=4, n=64)
    z0 = torch.zeros(4, 64, dtype=torch.float64)
    fast = broyden(f, z0, max_iter=40, tol=0.0, stop_mode="abs", rank=8)
    original = mod._next_step
    monkeypatch.setattr(mod, "_next_step", lambda *a, masked: original(*a, masked=True))
    masked = broyden(f, z0, max_iter=40, tol=0.0, stop_mode="abs", rank=8)
    torch.testing.assert_close(masked.abs_trace, fast.abs_trace, rtol=1e-9, atol=1e-14)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts tensor operations dispatched while `counting` is set (views included)."""

    def __init__(self):
        super().__init__()
        self.ops, self.counting = 0, True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += self.counting
        return func(*args, **(kwargs or {}))


def _ops_per_step(solver, B: int, **kw) -> float:
    """Tensor operations the solver dispatches outside f, per step, on a contraction that needs every step."""
    f_inner = _contraction(B=B, n=32, scale=0.9)
    counter = _OpCounter()

    def f(z):
        counter.counting = False
        try:
            return f_inner(z)
        finally:
            counter.counting = True

    with counter:
        res = solver(f, torch.zeros(B, 32, dtype=torch.float64), max_iter=20, tol=0.0, **kw)
    assert res.nstep == 20
    return counter.ops / res.nstep


@pytest.mark.parametrize("solver,bound", [(fixed_point, 10), (anderson, 48), (broyden, 110)],
                         ids=["fixed_point", "anderson", "broyden"])
def test_a_solver_step_dispatches_a_bounded_number_of_ops_whatever_the_batch(solver, bound):
    # each dispatch costs microseconds (a kernel launch on a GPU; tens of them on a CPU right after f), so the
    # per-sample stopping decisions run on the host: the count must not grow with the batch
    small, large = _ops_per_step(solver, B=2), _ops_per_step(solver, B=64)
    assert small == large
    assert small <= bound
