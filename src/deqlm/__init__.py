"""deqlm: Deep Equilibrium Models for sequence modelling (Bai, Kolter, Koltun, NeurIPS 2019)."""

__version__ = "0.1.0"
