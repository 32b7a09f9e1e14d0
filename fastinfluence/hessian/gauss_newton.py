"""The Gauss-Newton matrix ``C = Jᵀ(∂²l/∂z²)J`` of any network."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastinfluence.hessian.differentiation import per_sample, without_batching_fallback_notes
from fastinfluence.hessian.network import NetworkBackend
from fastinfluence.hessian.protocol import Capability
from fastinfluence.labelled_data import Inputs, map_inputs
from fastinfluence.progress import progress_bar


class GaussNewtonBackend(NetworkBackend):
    """``C = Jᵀ(∂²l/∂z²)J``: ``J V`` by the fused tangent pass or ``jvp`` (by the transpose of
    a ``vjp`` without forward mode), then ``Jᵀ`` by ``vjp``."""

    name = curvature = "gauss-newton"
    capabilities = frozenset({Capability.FACTOR_ROWS})

    @property
    def positive_semidefinite(self) -> bool:
        """PSD by construction for the default cross-entropy; a custom loss may be
        non-convex in the output."""
        return self.fmodel.uses_cross_entropy

    def _batch_product(self, x, y, vectors):
        fmodel, differentiation = self.fmodel, self.differentiation
        x = differentiation.layout(x)

        def logits_of(theta: torch.Tensor) -> torch.Tensor:
            return fmodel.logits(theta, x)

        logits, pullback = torch.func.vjp(logits_of, fmodel.theta)
        tangents = differentiation.output_directional(fmodel, x, vectors, logits_of, pullback,
                                                      logits)
        curved = fmodel.loss_hessian_vp(logits.detach(), y, tangents)
        if len(vectors) == 1:
            return pullback(curved[0])[0][None]
        return torch.func.vmap(pullback)(curved)[0]

    @without_batching_fallback_notes
    def factor_rows(self, chunk_size: int) -> torch.Tensor:
        """``B`` ``[n·C, p]`` with ``BᵀB = C``: the rows ``R_iᵀ J_i / √n`` of every training
        sample, ``J_i = ∂z_i/∂θ`` ``[C, p]`` (``C`` the entries of a sample's output, ``T·V``
        for a language model's ``[T, V]``) (reverse mode, one row per output) and
        ``R_i R_iᵀ = ∂²l/∂z_i²`` (a root of the loss's output Hessian, which must be PSD),
        ``chunk_size`` samples per vectorised Jacobian. For the Woodbury solver."""
        fmodel = self.fmodel

        def logits_of(theta: torch.Tensor, x: Inputs):
            logits = fmodel.logits(theta, map_inputs(lambda t: t[None], x))[0]
            return logits, logits.detach()  # the logits come back with their Jacobian

        def jacobian(theta: torch.Tensor, x: Inputs):
            return per_sample(torch.func.jacrev(logits_of, has_aux=True), theta, x,
                              on_loop=self.note_sample_loop)

        blocks = []
        batches = self.train.batches(self.device, self.dtype)
        for x, y in progress_bar(batches, self.progress, "Gauss-Newton rows",
                                 self.train.num_batches()):
            for start in range(0, len(y), chunk_size):
                part = map_inputs(lambda t, start=start: t[start:start + chunk_size], x)
                blocks.append(self._rows_of(jacobian, part, y[start:start + chunk_size]))
        self.passes += 1
        return torch.cat(blocks) / self.num_samples**0.5

    def _rows_of(self, jacobian: Callable, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """``R_iᵀ J_i`` of the samples ``x``, stacked ``[len(x)·C, p]``."""
        fmodel = self.fmodel
        J, logits = jacobian(fmodel.theta, x)
        J = J.reshape(len(J), -1, J.shape[-1])  # an output of several axes as one vector
        with torch.no_grad():
            roots, convex = fmodel.loss_hessian_roots(logits, y)  # [C, batch, C]
            if not convex:
                raise ValueError("the Woodbury solver needs a loss convex in the model's "
                                 "output (its Hessian there has a negative eigenvalue): use "
                                 "solver='direct', which factors G + λI itself and says "
                                 "whether it is positive definite")
            roots = roots.reshape(len(roots), len(J), -1)
            return torch.einsum("cbo,bop->bcp", roots, J).reshape(-1, J.shape[-1])
