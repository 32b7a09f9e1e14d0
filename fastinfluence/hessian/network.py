"""What every network backend shares: gradients and directional derivatives of any network by
automatic differentiation, through the one :class:`~.differentiation.Differentiation` chosen
for the model when the backend is built."""

from __future__ import annotations

import torch

from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.differentiation import (
    SAMPLE_LOOP_NOTE,
    Differentiation,
    choose_differentiation,
    per_sample_gradients,
    without_batching_fallback_notes,
)
from fastinfluence.hessian.protocol import CurvatureBackend
from fastinfluence.labelled_data import Inputs, LabelledData
from fastinfluence.progress import progress_bar


class NetworkBackend(CurvatureBackend):
    """Gradients and directional derivatives of any network by automatic differentiation.

    Subclasses supply the curvature product of one batch (:meth:`_batch_product`).

    Args:
        fmodel: the model as a function of θ_S.
        train: the training set ``C`` is the mean over.
        example: inputs on which :func:`~.differentiation.choose_differentiation` tries the
            fused pass and forward mode (unused when ``differentiation`` is given).
        progress: show progress bars over batches.
        differentiation: the strategy to use instead of choosing one.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        train: LabelledData,
        example: Inputs | None,
        progress: bool = False,
        differentiation: Differentiation | None = None,
    ) -> None:
        self.fmodel = fmodel
        self.train = train
        self.progress = progress
        self.dim = fmodel.dim
        self.dtype = fmodel.dtype
        self.device = fmodel.device
        self.num_samples = len(train)
        self.passes = 0
        if differentiation is None:
            differentiation = choose_differentiation(fmodel, example)
        self.differentiation = differentiation
        self.scoring = differentiation.name
        self.scoring_reason = differentiation.reason

    def restrict(self, indices: torch.Tensor) -> NetworkBackend:
        return type(self)(self.fmodel, self.train.subset(indices), None,
                          differentiation=self.differentiation)

    def mean_gradient(self, data: LabelledData) -> torch.Tensor:
        fmodel = self.fmodel
        total = torch.zeros_like(fmodel.theta)
        count = 0
        for x, y in data.batches(fmodel.device, fmodel.dtype):
            total += torch.func.grad(lambda th, x=x, y=y: fmodel.losses(th, x, y).sum())(
                fmodel.theta
            )
            count += len(y)
        return total / count

    @without_batching_fallback_notes
    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        count = 0
        batches = self.train.batches(self.device, self.dtype)
        for x, y in progress_bar(batches, self.progress, "Hessian-vector product",
                                 self.train.num_batches()):
            total += self._batch_product(x, y, vectors)
            count += len(y)
        self.passes += 1
        return total / count

    def _batch_product(self, x: Inputs, y: torch.Tensor,
                       vectors: torch.Tensor) -> torch.Tensor:
        """``Σ_batch`` of the per-sample curvature times each row of ``vectors``."""
        raise NotImplementedError

    @without_batching_fallback_notes
    def directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        fmodel = self.fmodel
        batches = progress_bar(data.batches(fmodel.device, fmodel.dtype), self.progress,
                               f"scores ({data.name})", data.num_batches())
        return self.differentiation.loss_directional(fmodel, batches, directions)

    @without_batching_fallback_notes
    def per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        rows = [per_sample_gradients(self.fmodel, x, y, on_loop=self.note_sample_loop)
                for x, y in data.batches(self.fmodel.device, self.fmodel.dtype)]
        return torch.cat(rows)

    def note_sample_loop(self) -> None:
        """Say in ``scoring_reason`` that per-sample work ran sample by sample
        (:func:`~.differentiation.per_sample`)."""
        if SAMPLE_LOOP_NOTE not in (self.scoring_reason or ""):
            self.scoring_reason = "; ".join(filter(None, [self.scoring_reason,
                                                          SAMPLE_LOOP_NOTE]))
