"""The Gauss-Newton matrix ``C = Jᵀ(∂²l/∂z²)J`` of any network."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

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
        """``B`` ``[n·K, p]`` with ``BᵀB = C``: the rows ``R_iᵀ J_i / √n`` of every training
        sample (:meth:`_row_blocks`). For the Woodbury solver."""
        blocks = []
        for rows, convex in self._row_blocks(chunk_size, "Gauss-Newton rows"):
            if not convex:
                raise ValueError("the Woodbury solver needs a loss convex in the model's "
                                 "output (its Hessian there has a negative eigenvalue): use "
                                 "solver='direct', which factors G + λI itself and says "
                                 "whether it is positive definite")
            blocks.append(rows)
        return torch.cat(blocks) / self.num_samples**0.5

    @without_batching_fallback_notes
    def dense(self, chunk: int = 32) -> torch.Tensor:
        """``C = BᵀB`` explicitly, summed from the rows of ``chunk`` samples at a time
        (:meth:`_row_blocks`, gathered to :data:`GRAM_ROWS` rows per update): memory ``p²``
        plus those rows, never ``[n·K, p]``; time one pass of per-sample Jacobians plus
        ``n·K·p²/2`` multiply-adds (the lower block triangle only, mirrored), where building
        ``C`` from products with identity columns costs ``p`` Gauss-Newton products. A loss
        non-convex in the model output has no such rows (its output Hessian has no real
        root): there it falls back to the products, with a warning."""
        gram = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        pending: list[torch.Tensor] = []
        for rows, convex in self._row_blocks(chunk, "Gauss-Newton matrix"):
            if not convex:
                warnings.warn("solver='direct' builds this Gauss-Newton matrix from p "
                              "products with identity columns, not from Jacobian rows: the "
                              "loss has a negative curvature in the model output",
                              stacklevel=2)
                return super().dense(chunk)
            pending.append(rows)
            if sum(len(r) for r in pending) >= GRAM_ROWS:
                _add_lower_gram(gram, torch.cat(pending))
                pending = []
        if pending:
            _add_lower_gram(gram, torch.cat(pending))
        for start in range(0, self.dim, GRAM_BLOCK):  # mirror the blocks below the diagonal
            stop = start + GRAM_BLOCK
            gram[start:stop, stop:] = gram[stop:, start:stop].T
            diagonal = gram[start:stop, start:stop]
            diagonal.copy_((diagonal + diagonal.T) / 2)  # a product's rounding is not symmetric
        return gram.div_(self.num_samples)

    def _row_blocks(self, chunk_size: int, what: str) -> Iterator[tuple[torch.Tensor, bool]]:
        """The rows ``R_iᵀ J_i`` ``[chunk·K, p]`` of each chunk of ``chunk_size`` training
        samples, and whether the loss is convex there: ``J_i = ∂z_i/∂θ`` ``[C, p]`` (``C``
        the entries of a sample's output, ``T·V`` for a language model's ``[T, V]``; reverse
        mode, one row per output) and ``R_i R_iᵀ = ∂²l/∂z_i²`` with ``K`` columns (a root of
        the loss's output Hessian, of its PSD part where it is not convex; ``K = C − 1`` for
        softmax cross-entropy, whose Hessian has rank ``C − 1``). One pass over the data."""
        fmodel = self.fmodel

        def logits_of(theta: torch.Tensor, x: Inputs):
            logits = fmodel.logits(theta, map_inputs(lambda t: t[None], x))[0]
            return logits, logits.detach()  # the logits come back with their Jacobian

        def jacobian(theta: torch.Tensor, x: Inputs):
            return per_sample(torch.func.jacrev(logits_of, has_aux=True), theta, x,
                              on_loop=self.note_sample_loop)

        batches = self.train.batches(self.device, self.dtype)
        for x, y in progress_bar(batches, self.progress, what, self.train.num_batches()):
            for start in range(0, len(y), chunk_size):
                part = map_inputs(lambda t, start=start: t[start:start + chunk_size], x)
                yield self._rows_of(jacobian, part, y[start:start + chunk_size])
        self.passes += 1

    def _rows_of(self, jacobian: Callable, x: Inputs,
                 y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``R_iᵀ J_i`` of the samples ``x``, stacked ``[len(x)·K, p]``, and whether the loss
        is convex at them."""
        fmodel = self.fmodel
        J, logits = jacobian(fmodel.theta, x)
        J = J.reshape(len(J), -1, J.shape[-1])  # an output of several axes as one vector
        with torch.no_grad():
            roots, convex = fmodel.loss_hessian_roots(logits, y, minimal=True)  # [K, batch, C]
            roots = roots.reshape(len(roots), len(J), -1)
            return torch.einsum("kbo,bop->bkp", roots, J).reshape(-1, J.shape[-1]), convex


GRAM_ROWS = 2048
"""Rows gathered before each update of the explicit Gauss-Newton matrix: one product as deep
as this keeps the ``p × p`` update compute-bound."""
GRAM_BLOCK = 2048
"""Columns per block of the lower triangle in :func:`_add_lower_gram` (on one CPU thread,
1,024 × 18,043 float32 rows: 4.6 s by blocks of 2,048 against 8.3 s for the full product)."""


def _add_lower_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """``gram += rowsᵀ rows`` in the block columns of :data:`GRAM_BLOCK` columns, from the
    diagonal block down (the blocks above it are left alone: the product is symmetric)."""
    for start in range(0, gram.shape[1], GRAM_BLOCK):
        stop = start + GRAM_BLOCK
        gram[start:, start:stop].addmm_(rows[:, start:].T, rows[:, start:stop])
