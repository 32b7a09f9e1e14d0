"""A projected gradient store: influence for many queries in a k-dimensional space
(docs/design.md §7.4).

Per layer ``y_t = W a_t (+ b)`` of θ_S (the layers K-FAC factors, read through the same
registry rules: input patches ``a_t`` with a trailing 1 for the bias, output gradients
``δ_t`` at positions ``t``), a sample's gradient is ``Σ_t δ_t a_tᵀ``. With seeded projections
``P_out`` ``[k_out, out]`` and ``P_in`` ``[k_in, in (+1)]`` its Kronecker-factored projection
(LoGra, Choe et al. 2024) is

    ``P_out (Σ_t δ_t a_tᵀ) P_inᵀ = Σ_t (P_out δ_t)(P_in a_t)ᵀ``,

computed from the projected ``a_t`` and ``δ_t`` without the ``p``-dimensional gradient.
The layers' projections, flattened and concatenated, are ``g̃ = P g`` with
``P = blockdiag_l(P_out,l ⊗ P_in,l)`` of ``K = Σ_l k_out,l·k_in,l`` rows. A factor of size
``d`` gets ``k_f = min(k, d)`` rows: Gaussian entries scaled by ``1/√k_f`` when ``k < d``
(``E[PᵀP] = I``), a square orthogonal matrix (the Q of a Gaussian's QR) when ``k ≥ d``, so
that with ``k`` at least every layer dimension ``P`` is orthogonal and nothing is lost.

The curvature is the Gauss-Newton matrix of the mean training loss, exact in the projected
space: ``G_k = (1/n) Σ_i Σ_c (P J_iᵀ r_ic)(P J_iᵀ r_ic)ᵀ = P G Pᵀ``, the ``r_ic`` the columns of
the square root of the loss's Hessian in the output (for softmax cross-entropy
``√p_c (e_c − p)``, as the Woodbury solver's rows), projected like the gradients. We project
these Gauss-Newton factors rather than the per-sample gradients (the empirical Fisher) because
``G_k`` is then the k-dimensional image of the curvature the exact solvers use: with an
orthogonal ``P`` the store's scores equal ``Influence(..., hessian="gauss-newton")``'s, and
for ``k < d`` they are a projection of them, not of another matrix. Scores are

    ``I(z_i, q) = −g̃_qᵀ (G_k + λI)^{-1} g̃_i``

(``Influence.pairwise``'s sign: positive means up-weighting ``z_i`` raises ``q``'s loss),
through one ``K × K`` Cholesky factor in float64.

:meth:`GradientStore.build` writes ``g̃_i`` ``[n, K]`` (float32, float16 or float64) and, per
chunk of training samples, its ``Σ_i Σ_c`` term of ``G_k`` ``[K, K]`` (float64) in resumable
chunks (:mod:`fastinfluence.sharded_output`): a killed build resumes at the first unfinished
chunk. :meth:`GradientStore.top_influences` streams the chunks once per query batch, keeping a
running top list per query (memory ``O(chunk·m + m·top)``, never ``n × m``).

Under ``torch.distributed`` (docs/design.md §7.3) every rank runs the same chunk loop: each
projects its contiguous shard of the chunk's samples, the chunk's ``G_k`` term is all-reduced
and its rows gathered, and rank 0 writes both files (``out`` on a file system every rank
sees). Queries are projected shard by shard and gathered; each rank streams every
``world``-th chunk and the ranks' top lists are merged, so every rank returns what one
process would; the Cholesky factor of ``G_k + λI`` is rank 0's on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from fastinfluence import distributed
from fastinfluence.functional import FunctionalModel, LossFn, OutputFn
from fastinfluence.hessian.kfac import (
    KroneckerLayer,
    hessian_root_columns,
    kronecker_layers,
    layer_passes,
)
from fastinfluence.labelled_data import DataLike, LabelledData, first_samples
from fastinfluence.modes import eval_mode
from fastinfluence.output_session import OutputSession
from fastinfluence.params import ParamsSpec, select_parameters
from fastinfluence.progress import progress_bar
from fastinfluence.sharded_output import ChunkedOutput, OutputDirectory

if TYPE_CHECKING:
    from fastinfluence.scoring import Influence

Columns = Callable[[FunctionalModel, torch.Tensor, torch.Tensor], torch.Tensor]
"""The output directions a pass differentiates
(:func:`~fastinfluence.hessian.kfac.layer_passes`)."""
STORE_DTYPES = (torch.float32, torch.float16, torch.float64)
"""The dtypes the projected gradients are stored in (``G_k`` always float64)."""


@dataclass(frozen=True)
class StoreConfig:
    """The settings of a :class:`GradientStore`, validated on construction.

    Attributes:
        k: rows of each Kronecker factor's projection (``min(k, d)`` for a factor of size
            ``d``); the store's dimension is ``K = Σ_l k_out,l·k_in,l``.
        seed: the seed of the projections (the same seed gives the same ``P``).
        damping: ``λ ≥ 0`` in ``G_k + λI`` (applied at query time: changing it needs no
            rebuild).
        dtype: the dtype of the stored projected gradients.
        chunk_size: training samples per chunk file.
        batch_size: samples per forward/backward pass.
    """

    k: int
    seed: int = 0
    damping: float = 0.01
    dtype: torch.dtype = torch.float32
    chunk_size: int = 4096
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("k", "chunk_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if (isinstance(self.damping, bool) or not isinstance(self.damping, (int, float))
                or not self.damping >= 0):
            raise ValueError(f"damping must be a number ≥ 0, got {self.damping!r}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")


def projection(rows: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[min(rows, size), size]`` float64 projection: Gaussian scaled ``1/√rows`` when
    ``rows < size``, else a square orthogonal matrix (the Q of a Gaussian's QR)."""
    gaussian = torch.randn(min(rows, size), size, generator=generator, dtype=torch.float64)
    if rows < size:
        return gaussian / rows ** 0.5
    return torch.linalg.qr(gaussian)[0]


def _loss_gradient_column(fmodel: FunctionalModel, logits: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    """``∂l_i/∂z_i`` ``[1, B, ...]``: the direction whose output gradients are the
    per-sample loss gradient's ``δ_t``."""
    losses = fmodel.per_sample(logits, y)
    return torch.autograd.grad(losses.sum(), logits, retain_graph=True)[0][None]


def _gradient_and_root_columns(fmodel: FunctionalModel, logits: torch.Tensor,
                               y: torch.Tensor) -> torch.Tensor:
    """``∂l/∂z`` then the loss Hessian's root columns ``r_c`` (K-FAC's:
    :func:`~fastinfluence.hessian.kfac.hessian_root_columns`, ``C − 1`` of them for softmax
    cross-entropy; ``G_k`` is the same for any root): ``[1 + C, B, ...]``."""
    roots = hessian_root_columns(fmodel, logits, y)
    return torch.cat([_loss_gradient_column(fmodel, logits, y), roots])


class GradientStore:
    """Projected per-sample gradients of a training set on disk, and influence scores of
    many queries against them (module docstring: the math).

    Args:
        model: the network (eval mode is used for every pass; it is not written).
        train: the training data (any form :class:`~fastinfluence.Influence` takes).
        k: rows of each Kronecker factor's projection (:class:`StoreConfig`).
        out: the directory of the chunk files (resumable; other settings are refused).
        params: θ_S (as for :class:`~fastinfluence.Influence`; default ``"all"``). Every
            selected parameter must belong to a layer with a K-FAC rule (Linear, Conv2d,
            Embedding); others are refused by name.
        damping: ``λ`` in ``G_k + λI`` (:class:`StoreConfig`).
        seed: the projections' seed.
        dtype: the stored gradients' dtype: float32, float16 or float64.
        chunk_size: training samples per chunk file.
        batch_size: samples per pass.
        loss_fn: as for :class:`~fastinfluence.Influence`.
        output: as for :class:`~fastinfluence.Influence`.
        device: as for :class:`~fastinfluence.Influence`.
        progress: as for :class:`~fastinfluence.Influence`.
        process_group: as for :class:`~fastinfluence.Influence`: split the build and the
            queries over the ranks of this ``torch.distributed`` group (default: the default
            group when initialised); every rank gets the results of one process.
    """

    def __init__(self, model: nn.Module, train: DataLike, *, k: int,
                 out: str | os.PathLike, params: ParamsSpec = "all", damping: float = 0.01,
                 seed: int = 0, dtype: torch.dtype = torch.float32, chunk_size: int = 4096,
                 batch_size: int = 64, loss_fn: LossFn | None = None,
                 output: OutputFn | None = None, device: torch.device | str | None = None,
                 progress: bool = False, process_group: Any | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(out, (str, os.PathLike)):
            raise TypeError(f"out must be a directory path, got {out!r}")
        self.config = StoreConfig(k, seed, damping, dtype, chunk_size, batch_size)
        self.model, self.out, self.progress = model, out, progress
        group = distributed.process_group(process_group)
        self.shards = None if group is None else distributed.Shards.of(group)
        self.train = LabelledData(train, "train", batch_size)
        first = next(model.parameters())
        example = first_samples(next(iter(self.train.batches(first.device, first.dtype)))[0], 2)
        self.selection = select_parameters(model, params, example=example)
        self.fmodel = FunctionalModel(model, self.selection, loss_fn,
                                      torch.device(first.device if device is None else device),
                                      output)
        try:
            self.layers: list[KroneckerLayer] = kronecker_layers(self.fmodel)
        except ValueError as error:
            raise ValueError(f"GradientStore projects the layers K-FAC reads: {error}") from None
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same P on any device
        place = {"device": self.fmodel.device, "dtype": self.fmodel.dtype}
        self.projections = [
            (projection(k, layer.out_features, generator).to(**place),
             projection(k, layer.in_features, generator).to(**place))
            for layer in self.layers
        ]
        self.dim = sum(p_out.shape[0] * p_in.shape[0] for p_out, p_in in self.projections)
        """``K``, the store's dimension."""
        self._session = OutputSession(self.fmodel, self.train, None, {
            "store": {"params": list(self.selection.names), "k": k, "seed": seed,
                      "dtype": str(dtype), "model_dtype": str(self.fmodel.dtype)},
        }, group, progress)
        self._cholesky: torch.Tensor | None = None

    # -- building ------------------------------------------------------------------------

    def build(self) -> GradientStore:
        """Write every chunk not yet in ``out`` (its ``g̃_i`` and its term of ``G_k``); a
        killed build resumes at the first unfinished chunk. Returns the store."""
        gradients, curvature = self._chunks()
        todo = sorted(set(range(gradients.num_chunks))
                      - (gradients.finished & curvature.finished))
        writer = gradients.directory.writer  # the other ranks hold no chunk
        with eval_mode(self.model):
            for index in progress_bar(todo, self.progress, "gradient store chunks", len(todo)):
                term, rows = self._chunk(gradients.rows(index))
                if writer:
                    curvature.write(index, term[None])
                    gradients.write(index, rows.to(self.config.dtype))
        if self.shards is not None:  # the files are whole before any rank reads them
            dist.barrier(group=self.shards.group)
        self._cholesky = None
        return self

    def _chunk(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``G_k`` term ``Σ_i Σ_c`` ``[K, K]`` (float64) and the projected gradients
        ``[len(rows), K]`` (on the CPU) of the training samples at ``rows``; across ranks,
        each projects its shard of them, the term is all-reduced and the rows gathered."""
        shards = self.shards
        start, stop = (0, len(rows)) if shards is None else shards.bounds(len(rows))
        term = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        local = None
        if stop > start:
            projected = self._project(self.train.subset(rows[start:stop]),
                                      _gradient_and_root_columns)
            factors = projected[1:].reshape(-1, self.dim).to("cpu", torch.float64)
            term = factors.T @ factors
            local = projected[0].to("cpu")
        if shards is None:
            return term, local
        like = torch.empty(1, self.dim, dtype=self.fmodel.dtype)
        return shards.sum(term), shards.gather(local, len(rows), like)

    def _chunks(self) -> tuple[ChunkedOutput, ChunkedOutput]:
        directory: OutputDirectory = self._session.open(self.out)
        size = self.config.chunk_size
        gradients = directory.output("projected-gradients", {}, len(self.train), (self.dim,),
                                     self.config.dtype, size)
        curvature = directory.output("projected-curvature", {}, gradients.num_chunks,
                                     (self.dim, self.dim), torch.float64, 1)
        return gradients, curvature

    def _project(self, data: LabelledData, columns: Columns) -> torch.Tensor:
        """``[C', B, K]``: each column's per-sample ``Σ_t (P_out δ_t)(P_in a_t)ᵀ`` over the
        layers, flattened and concatenated (batches of ``data`` concatenated on ``B``)."""
        batches = []
        for layer_inputs, grads in layer_passes(self.fmodel, self.layers, data, False,
                                                "projected gradients", columns):
            pieces = []
            for layer, (p_out, p_in) in zip(self.layers, self.projections, strict=True):
                width = layer.in_features - int(bool(layer.bias))  # without the bias column
                inputs = layer.rule.projected_patches(layer.module, layer_inputs[layer.name],
                                                      p_in[:, :width])  # [B, T, k_in]
                if layer.bias:  # the bias column's constant 1
                    inputs += p_in[:, -1]
                outputs = grads[layer.name] @ p_out.T  # [C', B, T, k_out]
                per_sample = torch.einsum("cbto,bti->cboi", outputs, inputs)
                pieces.append(per_sample.flatten(2))
            batches.append(torch.cat(pieces, dim=2).detach())
        return torch.cat(batches, dim=1)

    def _finished(self) -> ChunkedOutput:
        gradients, curvature = self._chunks()
        missing = set(range(gradients.num_chunks)) - (gradients.finished & curvature.finished)
        if missing:
            raise ValueError(f"the store in out={str(self.out)!r} is unfinished (chunks "
                             f"{sorted(missing)[:6]} missing): call build() first")
        return gradients

    # -- the solve and queries -----------------------------------------------------------

    def curvature(self) -> torch.Tensor:
        """``G_k = P G Pᵀ`` ``[K, K]`` float64, summed from the finished chunks."""
        self._finished()
        _, chunks = self._chunks()
        return chunks.read().sum(dim=0) / len(self.train)

    def _factor(self) -> torch.Tensor:
        """The Cholesky factor of ``G_k + λI`` (computed once after a build)."""
        if self._cholesky is None:
            damping = self.config.damping
            matrix = self.curvature()
            matrix.diagonal().add_(damping)
            factor, info = torch.linalg.cholesky_ex(matrix)
            if info != 0:
                raise ValueError(f"G_k + λI is not positive definite (damping={damping}): "
                                 "raise damping")
            if self.shards is not None:  # every rank solves with rank 0's factor
                self.shards.broadcast(factor)
            self._cholesky = factor
        return self._cholesky

    def project(self, data: DataLike) -> torch.Tensor:
        """``g̃ = P ∇l(z)`` ``[m, K]`` (float64, on the CPU with the stored chunks) of each
        sample of ``data``."""
        samples = LabelledData(data, "queries", self.config.batch_size)
        shards = self.shards
        local = samples if shards is None else shards.local(samples)
        projected = None
        if local is not None:
            with eval_mode(self.model):
                projected = self._project(local, _loss_gradient_column)[0].to("cpu",
                                                                             torch.float64)
        if shards is None:
            return projected
        return shards.gather(projected, len(samples),
                             torch.empty(1, self.dim, dtype=torch.float64))

    def _solved_queries(self, queries: DataLike) -> torch.Tensor:
        """``(G_k + λI)^{-1} g̃_q`` ``[K, m]``."""
        return torch.cholesky_solve(self.project(queries).T, self._factor())

    def pairwise(self, queries: DataLike) -> torch.Tensor:
        """``I(z_i, q) = −g̃_qᵀ(G_k + λI)^{-1}g̃_i`` ``[n, m]`` (float64), as
        ``Influence.pairwise``; holds ``n × m`` scores: for small cases."""
        gradients = self._finished()
        solved = self._solved_queries(queries)
        return -(gradients.read().to(torch.float64) @ solved)

    def top_influences(self, queries: DataLike, top: int = 10, largest: bool = True,
                       exact: Influence | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's ``top`` training samples by score, streaming the chunks.

        Args:
            queries: labelled data, ``m`` samples.
            top: how many per query (at most ``n``).
            largest: the highest scores (most harmful: up-weighting them raises the query's
                loss most) or, ``False``, the lowest (most helpful).
            exact: an :class:`~fastinfluence.Influence` on the same training set and θ_S:
                the candidates' scores are replaced by its full-space
                ``Influence.pairwise(queries, rows=...)`` (at its own damping) and each list
                re-sorted.

        Returns:
            ``(indices [m, top], scores [m, top])``, best first; only ``m·(chunk + top)``
            scores are held at a time.
        """
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(self.train):
            raise ValueError(f"top must be an int in [1, {len(self.train)}], got {top!r}")
        if exact is not None:
            self._check_exact(exact)
        gradients = self._finished()
        solved = self._solved_queries(queries)
        sign = 1.0 if largest else -1.0
        best_values = solved.new_full((solved.shape[1], 0), 0.0)
        best_indices = torch.zeros((solved.shape[1], 0), dtype=torch.long)
        mine = (range(gradients.num_chunks) if self.shards is None else
                range(self.shards.rank, gradients.num_chunks, self.shards.world))
        for index in mine:
            rows = gradients.rows(index)
            chunk = torch.from_numpy(gradients.chunk(index).copy()).to(torch.float64)
            values = sign * -(chunk @ solved).T  # [m, rows]
            best_values, best_indices = _best(best_values, best_indices, values,
                                              rows.expand(len(values), -1), top)
        if self.shards is not None:
            best_values, best_indices = self._merged(best_values, best_indices, top)
        scores = sign * best_values
        if exact is None:
            return best_indices, scores
        candidates, inverse = best_indices.unique(return_inverse=True)
        rescored = exact.pairwise(queries, rows=candidates).to(torch.float64)  # [u, m]
        scores = rescored.T.gather(1, inverse)
        order = (sign * scores).argsort(dim=1, descending=True, stable=True)
        return best_indices.gather(1, order), scores.gather(1, order)

    def _merged(self, values: torch.Tensor, indices: torch.Tensor,
                top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's top lists ``[m, ≤ top]`` (of its chunks) merged into the top
        ``top`` (padded with ``−∞`` to one width for the gather; ``top ≤ n`` leaves the pads
        out)."""
        padding = top - values.shape[1]
        values = torch.cat([values, values.new_full((len(values), padding), -torch.inf)], 1)
        indices = torch.cat([indices, indices.new_full((len(indices), padding), -1)], 1)
        group, world = self.shards.group, self.shards.world
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_indices = [torch.empty_like(indices) for _ in range(world)]
        dist.all_gather(all_values, values, group=group)
        dist.all_gather(all_indices, indices, group=group)
        return _best(values[:, :0], indices[:, :0], torch.cat(all_values, 1),
                     torch.cat(all_indices, 1), top)

    def _check_exact(self, exact: Influence) -> None:
        if len(exact.train) != len(self.train):
            raise ValueError(f"exact: its training set has {len(exact.train)} samples, the "
                             f"store's {len(self.train)}")
        if list(exact.selection.names) != list(self.selection.names):
            raise ValueError(f"exact: its θ_S {list(exact.selection.names)[:4]} is not the "
                             f"store's {list(self.selection.names)[:4]}")


def _best(values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor,
          new_indices: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest of a running list ``(values, indices)`` ``[m, ·]`` and new
    candidates, with their indices."""
    merged = torch.cat([values, new_values], dim=1)
    merged_indices = torch.cat([indices, new_indices], dim=1)
    best, position = merged.topk(min(top, merged.shape[1]), dim=1)
    return best, merged_indices.gather(1, position)
