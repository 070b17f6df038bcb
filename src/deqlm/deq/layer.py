"""The implicit (deep-equilibrium) layer: z* = f(z*), solved without a graph, differentiated implicitly.

Forward: z* = solve(f, z0) under no_grad. With gradients enabled the layer then applies f once with a graph,
z1 = f(z*) (z* a fresh leaf), and returns z1 wrapped in `_ImplicitBackward`. Backward (Bai et al. 2019, Thm 1,
the implicit function theorem): given dL/dz*, solve the adjoint fixed point

    y = y J_f(z*) + dL/dz*

with `b_solver`, each evaluation one vector-Jacobian product through the stored graph of z1 = f(z*), then hand
y to that same graph, which carries it to the parameters and tensors f captures. A training step therefore
stores exactly one application of f for backward, whatever the number of solver steps.

grad=K instead applies f K times with a graph from z* (the unrolled "phantom" gradient family): no adjoint
solve, K stored applications.

grad=reversible (with f_solver=reversible) backpropagates exactly through the reversible iteration, rebuilding
its states in backward (`deqlm.deq.reversible`): no stored application of f at all. It needs f's inputs
explicitly: f is called as f(z, ctx), and `weights` gives the other tensors f reads.
"""

# B: batch (dim 0 of z); z has any shape (B, ...)

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from deqlm.choices import IMPLICIT, REVERSIBLE, check_reversible_pair, parse_grad
from deqlm.deq.reversible import ReversibleCall, reversible_apply
from deqlm.solvers import SOLVERS, SolverResult, get_solver


class _ImplicitBackward(torch.autograd.Function):
    """Identity on f(z*) whose backward replaces dL/dz* by the adjoint solution y = y J_f(z*) + dL/dz*."""

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z_in: torch.Tensor, solve: Callable, stats: dict) -> torch.Tensor:
        ctx.save_for_backward(fz, z_in)
        ctx.solve, ctx.stats = solve, stats
        return fz.clone()

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): y below would be a constant, silently
            raise RuntimeError(
                "the implicit DEQ gradient is first-order only (backward with create_graph=True); "
                "use grad=K (unrolled steps) for higher-order derivatives"
            )
        fz, z_in = ctx.saved_tensors

        def adjoint_map(y: torch.Tensor) -> torch.Tensor:
            # an f that ignores z has J = 0 (autograd would call z unused)
            (yJ,) = torch.autograd.grad(fz, z_in, y, retain_graph=True, allow_unused=True)
            return grad_z if yJ is None else yJ + grad_z

        # y0 = dL/dz* (the first plain step from 0) saves one vector-Jacobian product
        res: SolverResult = ctx.solve(adjoint_map, grad_z)
        ctx.stats.update(
            b_nstep=float(res.nstep),
            b_abs_res=res.abs_res,
            b_rel_res=res.rel_res,
            b_converged_frac=res.converged_frac,
        )
        return res.z.to(grad_z.dtype), None, None, None


class DEQFixedPoint(nn.Module):
    """z_star, stats = deq(f, z0): the fixed point of the closure f, differentiable w.r.t. all that f
    captures.

    No parameters of its own; a module so that `model.eval()` reaches it. The forward solve is capped at
    `f_max_iter` in training and evaluation alike; an evaluation cap (TorchDEQ's `eval_f_max_iter`) is the
    evaluator's to decide (`deqlm.eval.settings`), and it hands it in per call. One call can set its own
    forward cap and tolerance, `deq(f, z0, max_iter=..., tol=...)` (as TorchDEQ's
    per-call `solver_kwargs`) and leaves the layer as it was: the evaluator passes its settings this way
    rather than writing them into the module.
    `solver_kwargs` maps a solver name to its extra keyword arguments, e.g.
    {"broyden": {"rank": 30}, "anderson": {"m": 6, "beta": 1.0, "lam": 1e-4}}.

    stats (Python floats): f_nstep, f_evals, f_abs_res, f_rel_res, converged_frac; after backward of an
    implicit layer the same dict also holds b_nstep, b_abs_res, b_rel_res, b_converged_frac; after backward of
    a reversible one b_nstep (steps walked back) and rev_recon_err (see deqlm.deq.reversible.reverse).
    Without grad the layer returns the solver's z*; with grad it returns f(z*) carrying the gradient (the
    reversible gradient: the last iterate itself).
    """

    def __init__(
        self,
        f_solver: str = "broyden",
        b_solver: str = "broyden",
        f_max_iter: int = 30,
        b_max_iter: int = 40,
        f_tol: float = 1e-3,
        b_tol: float = 1e-3,
        stop_mode: str = "rel",
        grad: str | int = IMPLICIT,
        solver_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        super().__init__()
        get_solver(f_solver), get_solver(b_solver)  # validate early (stop_mode: the solver checks it)
        check_reversible_pair(f_solver, parse_grad(grad))
        solver_kwargs = {k: dict(v) for k, v in (solver_kwargs or {}).items()}
        for name in solver_kwargs:
            if name not in SOLVERS:
                raise ValueError(f"solver_kwargs key {name!r} is not a solver; valid: {', '.join(SOLVERS)}")
        self.f_solver, self.b_solver = f_solver, b_solver
        self.f_max_iter, self.b_max_iter = int(f_max_iter), int(b_max_iter)
        self.f_tol, self.b_tol = float(f_tol), float(b_tol)
        self.stop_mode = stop_mode
        self.grad = parse_grad(grad)
        self.solver_kwargs = solver_kwargs

    @classmethod
    def from_config(cls, cfg: Any) -> DEQFixedPoint:
        """Build from a `deqlm.config.DEQConfig` (or anything with its fields)."""
        return cls(
            f_solver=cfg.f_solver,
            b_solver=cfg.b_solver,
            f_max_iter=cfg.f_max_iter,
            b_max_iter=cfg.b_max_iter,
            f_tol=cfg.f_tol,
            b_tol=cfg.b_tol,
            stop_mode=cfg.stop_mode,
            grad=cfg.grad,
            solver_kwargs={
                "broyden": {"rank": cfg.broyden_rank},
                "anderson": {"m": cfg.anderson_m, "beta": cfg.anderson_beta, "lam": cfg.anderson_lam},
                "reversible": {"beta": cfg.reversible_beta, "state_dtype": cfg.reversible_dtype},
            },
        )

    def _solve(self, name: str, f: Callable, z0: torch.Tensor, max_iter: int, tol: float) -> SolverResult:
        kwargs = self.solver_kwargs.get(name, {})
        return get_solver(name)(f, z0, max_iter=max_iter, tol=tol, stop_mode=self.stop_mode, **kwargs)

    def forward(
        self,
        f: Callable[..., torch.Tensor],
        z0: torch.Tensor,
        ctx: dict | None = None,
        *,
        weights: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]] = (),
        max_iter: int | None = None,
        tol: float | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """f(z), or f(z, ctx) when `ctx` is given. `weights`: the tensors f reads besides ctx, or a function
        returning them, called only by the reversible gradient (the other gradients follow f's own graph and
        need neither). `max_iter` / `tol`: this call's forward cap and tolerance (None: the layer's own)."""
        grad_on = torch.is_grad_enabled()
        max_iter = self.f_max_iter if max_iter is None else max_iter
        tol = self.f_tol if tol is None else tol
        if grad_on and self.grad == REVERSIBLE:
            f_ctx = f if ctx is not None else (lambda z, _ctx: f(z))
            read = weights() if callable(weights) else weights
            return self._reversible(f_ctx, z0, ctx or {}, read, max_iter, tol)
        f_z = f if ctx is None else (lambda z: f(z, ctx))
        with torch.no_grad():
            res = self._solve(self.f_solver, f_z, z0.detach(), max_iter, tol)
        stats = {
            "f_nstep": float(res.nstep),
            "f_evals": float(res.f_evals),
            "f_abs_res": res.abs_res,
            "f_rel_res": res.rel_res,
            "converged_frac": res.converged_frac,
        }
        z_star = res.z
        if not grad_on:
            return z_star, stats
        if self.grad == IMPLICIT:
            z_in = z_star.detach().requires_grad_()
            fz = f_z(z_in)
            b_name, b_max_iter, b_tol = self.b_solver, self.b_max_iter, self.b_tol

            def solve(adjoint_map: Callable, y0: torch.Tensor) -> SolverResult:
                return self._solve(b_name, adjoint_map, y0, b_max_iter, b_tol)

            return _ImplicitBackward.apply(fz, z_in, solve, stats), stats
        z = z_star.detach()
        for _ in range(self.grad):
            z = f_z(z)
        return z, stats

    def _reversible(
        self,
        f: Callable,
        z0: torch.Tensor,
        ctx: dict,
        weights: Sequence[torch.Tensor],
        max_iter: int,
        tol: float,
    ) -> tuple[torch.Tensor, dict]:
        stats: dict = {}
        call = ReversibleCall(
            f=f, ctx=ctx, z0=z0.detach(), max_iter=max_iter, tol=tol, stop_mode=self.stop_mode,
            options=self.solver_kwargs.get(REVERSIBLE, {}), stats=stats,
        )
        return reversible_apply(call, weights), stats

    def extra_repr(self) -> str:
        return (
            f"f_solver={self.f_solver}, b_solver={self.b_solver}, f_max_iter={self.f_max_iter}, "
            f"b_max_iter={self.b_max_iter}, f_tol={self.f_tol}, b_tol={self.b_tol}, "
            f"stop_mode={self.stop_mode}, "
            f"grad={self.grad}"
        )
