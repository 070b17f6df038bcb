"""The value every solver returns."""

# B: batch, T: recorded f-evaluations

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SolverResult:
    """Outcome of one root solve of g(z) = f(z) - z, batched over dim 0.

    `z` holds, per sample, the lowest-residual iterate the solver visited (in `stop_mode` units), in the shape
    and dtype of `z0`. Batch-level residuals are norms over the whole batch: `abs_res = ||f(z) - z||` and
    `rel_res = ||f(z) - z|| / ||f(z)||`, both taken over all samples together.
    """

    z: torch.Tensor  # the solution, shape and dtype of z0
    nstep: int  # solver steps taken (new iterates produced)
    f_evals: int  # calls of f (each on the full batch); nstep + 1 for all solvers here
    abs_res: float  # ||f(z) - z|| over the batch at the returned z
    rel_res: float  # ||f(z) - z|| / ||f(z)|| over the batch at the returned z
    abs_res_B: torch.Tensor  # per-sample ||f(z) - z|| at the returned z
    rel_res_B: torch.Tensor  # per-sample ||f(z) - z|| / ||f(z)|| at the returned z
    converged: bool  # every sample reached tol
    converged_B: torch.Tensor  # per-sample: reached tol
    abs_trace: torch.Tensor  # (T, B) per-sample ||f(z_t) - z_t|| of every evaluated iterate
    rel_trace: torch.Tensor  # (T, B) the same, relative

    @property
    def converged_frac(self) -> float:
        return float(self.converged_B.float().mean())
