"""The implicit layer (DEQFixedPoint) and Jacobian diagnostics / regularisation at the equilibrium."""

from deqlm.deq.jacobian import jac_reg_loss, spectral_radius
from deqlm.deq.layer import DEQFixedPoint

__all__ = ["DEQFixedPoint", "jac_reg_loss", "spectral_radius"]
