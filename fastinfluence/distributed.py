"""Influence over the ranks of a ``torch.distributed`` process group (docs/design.md §7.3).

Started by ``torchrun`` (gloo on CPU, NCCL on GPU), every rank builds the same
:class:`~fastinfluence.Influence` on the same data; the work is split, the results are those
of one process:

* the training set is cut into contiguous shards, one per rank (sizes differ by at most one
  sample; a rank may hold none). Each rank builds its curvature backend on its shard only;
* every sum over samples — the validation gradient, each curvature product, the explicit
  matrix — is taken over the local shard and all-reduced, so every rank holds the same
  numbers, and the solvers run the same iterations everywhere (LiSSA draws its minibatches
  from one seed: the same global indices on every rank, each rank evaluating its own);
* K-FAC/EK-FAC factors (``hessian="kfac"/"ekfac"``, and CG's preconditioner) are fitted the
  same way: each rank sums its shard's covariances, sample counts and eigenvalue corrections,
  the sums are all-reduced (:class:`SampleSums`), and rank 0's eigenbases are broadcast, so
  every rank holds the factors of one process and their products and inverse need no
  further communication;
* per-sample results (scores, per-sample gradients, perturbation maps) are computed on each
  rank's shard of the data asked for and gathered in the data's order, on every rank
  (:class:`DistributedBackend` wraps the process's backend, so callers never shard by hand).

Replicated on every rank: the model snapshot, ``s``, the K-FAC factors and the solver's state.
Not distributed yet: the closed-form head's native minibatch LiSSA: the generic recursion runs
instead, so that one case draws other minibatches than one process does (the ranks agree with
each other; both are estimates of the same solve).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastinfluence.hessian.protocol import Capability, CurvatureBackend
from fastinfluence.labelled_data import LabelledData


def process_group(group: Any | None) -> Any | None:
    """The group to split over: ``group`` if given, else the default group when
    ``torch.distributed`` is initialised; ``None`` (one process) otherwise or for one rank."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@dataclass(frozen=True)
class Shards:
    """Contiguous shards of ``n`` samples over the ranks of ``group``."""

    group: Any
    rank: int
    world: int

    @classmethod
    def of(cls, group: Any) -> Shards:
        """The shards of the calling process in ``group``."""
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s shard (default: this process's)."""
        rank = self.rank if rank is None else rank
        return n * rank // self.world, n * (rank + 1) // self.world

    def local(self, data: LabelledData) -> LabelledData | None:
        """This rank's shard of ``data`` (``None`` when it is empty)."""
        start, stop = self.bounds(len(data))
        if start == stop:
            return None
        return data.subset(torch.arange(start, stop))

    def gather(self, local: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
        """The rows of every rank's shard of ``n`` samples, concatenated in rank order."""
        sizes = [stop - start for start, stop in (self.bounds(n, r) for r in range(self.world))]
        width = max(sizes)
        padded = like.new_zeros(width, *like.shape[1:])
        if local is not None:
            padded[: len(local)] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (every rank gets the sum)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place)."""
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tensor


@dataclass(frozen=True)
class SampleSums:
    """Sums over every rank's training samples, for what a backend fits on one rank's shard
    (K-FAC/EK-FAC factors).

    Attributes:
        shards: how the samples are split.
        holds_samples: whether this rank's shard has samples (one without builds its backend
            on a stand-in sample, which must add nothing).
    """

    shards: Shards
    holds_samples: bool

    def total(self, local: torch.Tensor) -> torch.Tensor:
        """``local``, a sum over this rank's samples, summed over every rank (in place)."""
        if not self.holds_samples:
            local.zero_()
        return self.shards.sum(local)

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (in place): an eigendecomposition computed on
        every rank from the same sums may still differ by rounding or eigenvector signs on
        other hardware, and the solvers must run the same iterations everywhere."""
        return self.shards.broadcast(tensor)


Build = Callable[[LabelledData, SampleSums | None], CurvatureBackend]
"""Builds the backend of one process on a training set (a rank's shard of it, with the
:class:`SampleSums` that span the ranks; ``None`` in one process)."""


class DistributedBackend(CurvatureBackend):
    """A backend whose sums run over every rank's shard of the training set.

    A backend with a closed-form inverse (K-FAC/EK-FAC) fitted its factors over every rank's
    samples (:class:`SampleSums`): its products and inverse are already those of the whole
    training set, taken as they are; every other backend's products are summed here.

    Args:
        build: builds the backend of one process on this rank's shard (:data:`Build`).
        train: the whole training set (the same on every rank).
        shards: how the samples are split.
    """

    def __init__(
        self,
        build: Build,
        train: LabelledData,
        shards: Shards,
        *,
        inner: CurvatureBackend | None = None,
        local_count: int | None = None,
        total: int | None = None,
    ) -> None:
        self.shards = shards
        self.train = train
        self.local_train: LabelledData | None = None  # restricted views only take products
        if inner is None:
            self.local_train = shards.local(train)
            local_count = 0 if self.local_train is None else len(self.local_train)
            total = len(train)
        self.sample_sums = SampleSums(shards, bool(local_count))
        if inner is None:
            # A rank without samples still needs the model's layout and scoring pass: it
            # builds its backend on one sample and contributes nothing to the sums.
            inner = build(self.local_train or train.subset(torch.arange(1)), self.sample_sums)
        # the only optional capability that spans the ranks: factors fitted over all of them
        self.capabilities = inner.capabilities & {Capability.CLOSED_FORM_INVERSE}
        self.factored = inner.offers(Capability.CLOSED_FORM_INVERSE)
        self.inner = inner
        self.local_count = local_count
        self.num_samples = total
        self.name = inner.name
        self.curvature = inner.curvature
        self.scoring = inner.scoring
        self.scoring_reason = inner.scoring_reason
        self.positive_semidefinite = inner.positive_semidefinite
        self.dim = inner.dim
        self.dtype = inner.dtype
        self.device = inner.device
        self.passes = 0

    def _summed(self, local_mean: Callable[[], torch.Tensor], like: torch.Tensor,
                count: int, total: int) -> torch.Tensor:
        """``(Σ_ranks count_r · mean_r) / total``: the mean over every rank's samples."""
        local = local_mean() * count if count else torch.zeros_like(like)
        return self.shards.sum(local) / total

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        if self.factored:
            return self.inner.matvec(vectors)
        return self._summed(lambda: self.inner.matvec(vectors), vectors, self.local_count,
                            self.num_samples)

    def closed_form_inverse(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """The inner backend's inverse, of factors that span every rank already."""
        return self.inner.closed_form_inverse(rhs, damping)

    def dense(self, chunk: int = 32) -> torch.Tensor:
        if self.factored:
            return self.inner.dense(chunk)
        like = torch.empty(self.dim, self.dim, dtype=self.dtype, device=self.device)
        return self._summed(lambda: self.inner.dense(chunk), like, self.local_count,
                            self.num_samples)

    def mean_gradient(self, data: LabelledData) -> torch.Tensor:
        local = self.shards.local(data)
        like = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        return self._summed(lambda: self.inner.mean_gradient(local), like,
                            0 if local is None else len(local), len(data))

    def directional(self, data: LabelledData, directions: torch.Tensor) -> torch.Tensor:
        local = self._local(data)
        rows = None if local is None else self.inner.directional(local, directions)
        like = directions.new_empty(1, len(directions))
        return self.shards.gather(rows, len(data), like)

    def per_sample_gradients(self, data: LabelledData) -> torch.Tensor:
        local = self._local(data)
        rows = None if local is None else self.inner.per_sample_gradients(local)
        like = torch.empty(1, self.dim, dtype=self.dtype, device=self.device)
        return self.shards.gather(rows, len(data), like)

    def perturbation(self, data: LabelledData, direction: torch.Tensor) -> torch.Tensor:
        local = self.shards.local(data)
        maps = None if local is None else self.inner.perturbation(local, direction)
        like = torch.empty(1, *data.tensors[0].shape[1:], dtype=self.dtype, device=self.device)
        return self.shards.gather(maps, len(data), like)

    def restrict(self, indices: torch.Tensor) -> DistributedBackend:
        """The curvature over the training samples at global ``indices`` (the same on every
        rank): each rank keeps the ones inside its shard."""
        start, stop = self.shards.bounds(self.num_samples)
        mine = indices[(indices >= start) & (indices < stop)] - start
        inner = self.inner.restrict(mine) if len(mine) else self.inner
        return DistributedBackend(lambda _data, _sums: inner, self.train, self.shards, inner=inner,
                                  local_count=len(mine), total=len(indices))

    def _local(self, data: LabelledData) -> LabelledData | None:
        """This rank's shard of ``data``; the cached shard for the training set, whose
        features the closed-form head keeps."""
        if data is self.train:
            return self.local_train
        return self.shards.local(data)


def wrap(build: Build, train: LabelledData, group: Any | None) -> CurvatureBackend:
    """``build(train, None)`` for one process; a :class:`DistributedBackend` over ``group``."""
    if group is None:
        return build(train, None)
    return DistributedBackend(build, train, Shards.of(group))
