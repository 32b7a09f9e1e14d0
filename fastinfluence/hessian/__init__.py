"""Hessian operators and inverse-HVP solvers."""
