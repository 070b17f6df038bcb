"""Jacobian diagnostics and regularisation at the equilibrium (Bai, Koltun, Kolter, ICML 2021)."""

# B: batch (dim 0 of z)

from __future__ import annotations

from collections.abc import Callable

import torch


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
    v = torch.randn_like(z_in)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (z.dim() - 1))
    rho_B = torch.zeros(z.shape[0], device=z.device)
    for _ in range(n_iter):
        (u,) = torch.autograd.grad(fz, z_in, v, retain_graph=True)
        rho_B = u.flatten(1).norm(dim=1)
        v = u / rho_B.clamp_min(1e-30).view(-1, *[1] * (z.dim() - 1))
    rho_B = rho_B.detach().float()
    return rho_B if per_sample else float(rho_B.max())
