"""The exact Hessian ``C = ∇²_θ L`` of any network."""

from __future__ import annotations

import torch

from fastinfluence.hessian.network import NetworkBackend


class ExactHessianBackend(NetworkBackend):
    """``C = ∇²_θ L``: forward-over-reverse products (``jvp`` of ``grad``), or
    reverse-over-reverse (``vjp`` of ``grad``, equal since ``H`` is symmetric) for models
    without forward-mode derivatives."""

    name = curvature = "exact"
    positive_semidefinite = False

    def _batch_product(self, x, y, vectors):
        fmodel = self.fmodel

        def summed_loss(theta: torch.Tensor) -> torch.Tensor:
            return fmodel.losses(theta, x, y).sum()

        grad_fn = torch.func.grad(summed_loss)
        return self.differentiation.hessian_products(fmodel, grad_fn, vectors)
