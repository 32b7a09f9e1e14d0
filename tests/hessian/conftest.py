"""A dense, explicitly known operator for the solver tests.

The solvers see an operator only through ``dim``, ``dtype``, ``device``, ``passes``,
``num_samples``, ``positive_semidefinite``, ``matvec``, ``dense``, ``subsample`` and the
optional capabilities it declares (none here: a
:class:`~fastinfluence.hessian.protocol.CurvatureBackend` declares none by default).
``DenseOperator`` provides exactly these, with ``H = mean_i S_i`` over per-sample symmetric
matrices ``S_i`` so that subsampling means what it means for a training set.
"""

from __future__ import annotations

import pytest
import torch

from fastinfluence.hessian.protocol import CurvatureBackend


class DenseOperator(CurvatureBackend):
    """``H = mean_i S_i`` for per-sample symmetric ``S_i`` [n, p, p]; products ``V ↦ V H``."""

    name = "dense"

    def __init__(self, per_sample: torch.Tensor, positive_semidefinite: bool = True) -> None:
        self.per_sample = per_sample
        self.positive_semidefinite = positive_semidefinite
        self.num_samples = len(per_sample)
        self.dim = per_sample.shape[1]
        self.dtype = per_sample.dtype
        self.device = per_sample.device
        self.passes = 0
        self.matrix = per_sample.mean(dim=0)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return vectors @ self.matrix

    def dense(self, chunk: int) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.cat([self.matvec(eye[start:start + chunk])
                          for start in range(0, self.dim, chunk)])

    def subsample(self, size: int, generator: torch.Generator) -> DenseOperator:
        indices = torch.randint(self.num_samples, (size,), generator=generator)
        return DenseOperator(self.per_sample[indices], self.positive_semidefinite)


def build_operator(kind: str = "spd", dtype: torch.dtype = torch.float64, n: int = 40,
                   p: int = 12, rank: int = 3, seed: int = 0) -> DenseOperator:
    """``S_i = F_iᵀF_i`` (PSD, ``H`` well conditioned for ``n·rank ≫ p``); ``"indefinite"``
    subtracts ``3·rank·uuᵀ`` for a fixed unit ``u``, which makes one eigenvalue of ``H``
    about ``−2·rank``."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, rank, p, generator=generator, dtype=torch.float64)
    per_sample = factors.transpose(1, 2) @ factors
    if kind == "indefinite":
        direction = torch.randn(p, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        per_sample = per_sample - 3 * rank * torch.outer(direction, direction)
    elif kind != "spd":
        raise ValueError(f"unknown operator kind {kind!r}")
    return DenseOperator(per_sample.to(dtype), positive_semidefinite=kind == "spd")


@pytest.fixture
def make_operator():
    """The :func:`build_operator` factory."""
    return build_operator


@pytest.fixture
def rhs():
    """Three float64 right-hand sides ``[3, 12]``."""
    return torch.randn(3, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
