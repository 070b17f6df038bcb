"""Jacobian diagnostics and regularisation at the equilibrium (Bai, Koltun, Kolter, ICML 2021).

Two penalties on J_f(z*), picked by `model.jac_norm`: the Frobenius norm of the follow-up paper (every
direction of J at once, estimated with Hutchinson probes) and the spectral radius (only the direction that
decides whether the plain iteration contracts, estimated by power iteration), an alternative put forward for
looped language models: a penalty on every singular value may cost the layer expressiveness that a penalty
on the dominant eigenvalue leaves alone.
"""

# B: batch (dim 0 of z)

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from deqlm.choices import JacNorm
from deqlm.infra.precision import at_least_float32

# (f(z), z) -> a differentiable scalar penalty
JacPenalty = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def jac_reg_loss(f_z: torch.Tensor, z: torch.Tensor, n_samples: int = 1) -> torch.Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / z.numel(), differentiable (create_graph=True).

    `f_z = f(z)` must have been computed with a graph from `z`, which requires grad. For v ~ N(0, I),
    E ||v^T J||^2 = ||J||_F^2; the estimate averages `n_samples` probes.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} must be >= 1")
    total = f_z.new_zeros(())
    for _ in range(n_samples):
        v = torch.randn_like(z)
        (vJ,) = torch.autograd.grad(f_z, z, v, create_graph=True, retain_graph=True)
        total = total + vJ.float().pow(2).sum()
    return total / (n_samples * z.numel())


def _unit_per_sample(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))


def spectral_reg_loss(f_z: torch.Tensor, z: torch.Tensor, n_iter: int = 4) -> torch.Tensor:
    """Power-iteration estimate of the per-sample spectral radius of J_f(z), squared and averaged over the
    batch; differentiable through its last step only.

    `n_iter - 1` vector-Jacobian products without a graph turn a random probe towards the dominant direction,
    and a last one with create_graph=True gives rho_B = ||v J|| for that unit v. Gradients flow through J
    (the weights and z), not through the choice of v, as in any power-iteration penalty. Few steps leave v
    short of the dominant direction: ||v J|| then lies anywhere up to J's largest singular value, which
    bounds the radius from above, so the penalty is an estimate, not a bound.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter={n_iter!r} must be >= 1")
    v = _unit_per_sample(torch.randn_like(z))
    for _ in range(n_iter - 1):
        (u,) = torch.autograd.grad(f_z, z, v, retain_graph=True)
        v = _unit_per_sample(u)
    (vJ,) = torch.autograd.grad(f_z, z, v, create_graph=True, retain_graph=True)
    return at_least_float32(vJ).flatten(1).pow(2).sum(dim=1).mean()


def jacobian_penalty(norm: JacNorm, jac_samples: int, power_iters: int) -> JacPenalty:
    """The configured penalty as a function of (f(z), z)."""
    if norm == "spectral":
        return partial(spectral_reg_loss, n_iter=power_iters)
    return partial(jac_reg_loss, n_samples=jac_samples)


def spectral_radius(
    f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, n_iter: int = 20, per_sample: bool = False
) -> float | torch.Tensor:
    """Power-iteration estimate of the spectral radius of J_f(z), per sample (f must not mix samples).

    Iterates v <- v J / ||v J|| with vector-Jacobian products (J^T has the spectrum of J). Returns the largest
    per-sample estimate as a float, or the (B,) tensor with `per_sample=True`. A diagnostic: with a complex
    dominant eigenvalue pair the estimate oscillates around |lambda|.
    """
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(z_in)
    v = _unit_per_sample(torch.randn_like(z_in))
    rho_B = torch.zeros(z.shape[0], device=z.device)
    for _ in range(n_iter):
        (u,) = torch.autograd.grad(fz, z_in, v, retain_graph=True)
        rho_B = u.flatten(1).norm(dim=1)
        v = u / rho_B.clamp_min(1e-30).view(-1, *[1] * (z.dim() - 1))
    rho_B = rho_B.detach().float()
    return rho_B if per_sample else float(rho_B.max())
