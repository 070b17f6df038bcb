"""The implicit layer (DEQFixedPoint) and Jacobian diagnostics / regularisation at the equilibrium."""

from deqlm.deq.jacobian import JacPenalty, jac_reg_loss, jacobian_penalty, spectral_radius, spectral_reg_loss
from deqlm.deq.layer import DEQFixedPoint

__all__ = [
    "DEQFixedPoint", "JacPenalty", "jac_reg_loss", "jacobian_penalty", "spectral_radius", "spectral_reg_loss",
]
