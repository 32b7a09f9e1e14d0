"""K-FAC and EK-FAC: the Kronecker-factored Gauss-Newton matrix (:mod:`.kfac`), inverted in
closed form."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.kfac import KroneckerCurvature
from fastinfluence.hessian.network import NetworkBackend
from fastinfluence.hessian.protocol import Capability
from fastinfluence.labelled_data import Inputs, LabelledData

if TYPE_CHECKING:
    from fastinfluence.distributed import SampleSums


class KroneckerBackend(NetworkBackend):
    """K-FAC (``"kfac"``) or EK-FAC (``"ekfac"``): the layer-wise Kronecker-factored
    Gauss-Newton matrix of :mod:`.kfac`, fitted once on the training set (under
    ``torch.distributed``: on this rank's shard, with ``sample_sums`` spanning the ranks);
    products and the damped inverse in closed form (the direct solver uses the inverse, no
    explicit matrix)."""

    positive_semidefinite = True
    capabilities = frozenset({Capability.CLOSED_FORM_INVERSE})

    def __init__(
        self,
        fmodel: FunctionalModel,
        train: LabelledData,
        example: Inputs,
        progress: bool = False,
        eigen_corrected: bool = False,
        sample_sums: SampleSums | None = None,
    ) -> None:
        super().__init__(fmodel, train, example, progress)
        self.name = self.curvature = "ekfac" if eigen_corrected else "kfac"
        self.factors = KroneckerCurvature(fmodel, train, eigen_corrected, progress,
                                          sample_sums=sample_sums)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return self.factors.matvec(vectors)

    def closed_form_inverse(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """``(C + λI)^{-1} rhs`` through the factors' eigenbases."""
        return self.factors.inverse(rhs, damping)

    def restrict(self, indices: torch.Tensor) -> NetworkBackend:
        raise ValueError(
            f"minibatch LiSSA is not offered for hessian={self.name!r}: its inverse is in "
            "closed form (solver='direct')"
        )
