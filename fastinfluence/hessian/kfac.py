"""K-FAC and EK-FAC: Kronecker-factored Gauss-Newton curvature with a closed-form inverse.

For a layer ``y_t = W a_t (+ b)`` — a Linear or Conv2d, or any layer type the layer
registry (:mod:`fastinfluence.layers`) gives a K-FAC rule — with input patches ``a_t`` (a
trailing 1 for the bias) and output gradients ``g_t`` at positions ``t`` (one position for a
Linear on ``[batch, features]``; every output pixel of a convolution), the layer's block of
the Gauss-Newton matrix is

    ``G = mean_i Σ_c vec(Σ_t g_itc a_itᵀ) vec(Σ_t g_itc a_itᵀ)ᵀ``,

where the ``g_itc`` are the output gradients of the columns ``c`` of a square root of the loss's
Hessian in the model output (for softmax cross-entropy, column ``c`` is ``√p_c (e_c − p)``), so
``Σ_c`` is exact, not sampled. K-FAC (Martens & Grosse 2015; for convolutions Grosse & Martens
2016) approximates each block by a Kronecker product of two small factors,

    ``G ≈ S ⊗ A``, ``A = mean_i Σ_t a_it a_itᵀ``, ``S = mean_i Σ_c Σ_t g_itc g_itcᵀ / T``,

ignoring the blocks between layers. With ``S = Q_S Λ_S Q_Sᵀ`` and ``A = Q_A Λ_A Q_Aᵀ``, the
damped inverse is applied in closed form, to a layer's parameters viewed as a matrix ``X``
``[out, in (+1)]``: ``(G + λI)^{-1} X = Q_S [(Q_Sᵀ X Q_A) ⊘ (λ_S λ_Aᵀ + λ)] Q_Aᵀ``. EK-FAC
(George et al. 2018) keeps the eigenbases and replaces ``λ_S λ_Aᵀ`` by the second moment of the
per-sample gradients in that basis, ``Λ* = mean_i Σ_c (Q_Sᵀ G_ic Q_A)²``, from a second pass
over the data. Damping is the additive ``λ`` of the rest of the library.

On one Linear layer with a loss whose output Hessian is constant (mean squared error), both
equal the exact Gauss-Newton matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastinfluence.functional import FunctionalModel
from fastinfluence.labelled_data import LabelledData, map_inputs
from fastinfluence.layers.huggingface import register_loaded
from fastinfluence.layers.registry import KroneckerRule, NotCovered, kfac_rule, registered
from fastinfluence.progress import progress_bar

if TYPE_CHECKING:
    from fastinfluence.distributed import SampleSums

KRONECKER_CURVATURES = ("kfac", "ekfac")


@dataclass
class KroneckerLayer:
    """One layer of θ_S that the layer registry's K-FAC rules cover, and its factors.

    Attributes:
        name: the module's name; ``weight``/``bias`` are the parameter names (``bias`` ``""``
            without one).
        module: the layer.
        offsets: where its weight and bias sit in the flat θ_S (``-1`` for no bias).
        rule: how its input patches and output gradients are read.
        activations: ``A`` ``[in (+1), in (+1)]``; ``gradients``: ``S`` ``[out, out]``.
        eigen: after :meth:`KroneckerCurvature.fit`, ``(Q_A, Q_S, eigenvalues [out, in (+1)])``.
    """

    name: str
    module: nn.Module
    weight: str
    bias: str
    offsets: tuple[int, int]
    rule: KroneckerRule
    activations: torch.Tensor | None = None
    gradients: torch.Tensor | None = None
    eigen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def out_features(self) -> int:
        """Rows of the layer's matrix view (output channels)."""
        weight = self.module.weight
        return weight.shape[1] if self.rule.transposed else weight.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the layer's matrix view, the bias column included."""
        weight = self.module.weight
        columns = weight.shape[0] if self.rule.transposed else weight[0].numel()
        return columns + int(bool(self.bias))


def kronecker_layers(fmodel: FunctionalModel, partial: bool = False) -> list[KroneckerLayer]:
    """The layers whose parameters make up θ_S, each with its registered K-FAC rule
    (:mod:`fastinfluence.layers`), or a ValueError naming what else the selection holds
    (``partial``: the covered layers alone, whatever else θ_S holds, as a preconditioner
    needs)."""
    register_loaded()
    selection = fmodel.selection
    offsets, start = {}, 0
    for name, shape in zip(selection.names, selection.shapes, strict=True):
        offsets[name] = start
        start += shape.numel()
    canonical = {id(p): name for name, p in fmodel.model.named_parameters()}
    covered: set[str] = set()
    layers = []
    for module_name, module in fmodel.model.named_modules():
        found = kfac_rule(module)
        if found is None or isinstance(found[1], NotCovered):
            continue
        rule = found[1]
        weight = canonical[id(module.weight)]
        bias_tensor = getattr(module, "bias", None)  # an Embedding has none
        bias = canonical[id(bias_tensor)] if bias_tensor is not None else ""
        if weight in covered or bias in covered:
            raise ValueError(f"K-FAC does not support parameters shared between layers "
                             f"({module_name!r} reuses {weight!r})")
        if weight not in offsets:
            if bias in offsets:
                raise ValueError(f"K-FAC needs both the weight and the bias of {module_name!r}")
            continue
        if bias and bias not in offsets:
            raise ValueError(f"K-FAC needs both the weight and the bias of {module_name!r}")
        reason = rule.check(module)
        if reason is not None:
            raise ValueError(f"{reason} ({module_name!r})")
        covered.update({weight, bias} - {""})
        layers.append(KroneckerLayer(module_name, module, weight, bias,
                                     (offsets[weight], offsets[bias] if bias else -1), rule))
    others = [name for name in selection.names if name not in covered]
    if others and not partial:
        kinds = [kind.__name__ for kind, entry in registered().items()
                 if entry.kfac is not None and not isinstance(entry.kfac, NotCovered)]
        raise ValueError(
            f"K-FAC's factors cover only the parameters of layers with a K-FAC rule "
            f"({', '.join(kinds)}); the selection also holds {others[:6]}"
            f"{_why_not(fmodel.model, others[0])}: select the {'/'.join(kinds)} modules by name"
        )
    return layers


def _why_not(model: nn.Module, parameter: str) -> str:
    """`` (<type> '<module>': <why K-FAC declines it>)`` for the module that owns
    ``parameter``."""
    owner_name, _, attribute = parameter.rpartition(".")
    owner = model.get_submodule(owner_name)
    found = kfac_rule(owner)
    reason = "no K-FAC rule is registered for it" if found is None else found[1].check(owner)
    return f" ({type(owner).__name__} {owner_name!r}: {reason})"


class KroneckerCurvature:
    """The factors of every layer of θ_S, fitted on the training set.

    Args:
        fmodel: the model as a function of θ_S.
        train: the data the curvature is the mean over.
        eigen_corrected: EK-FAC's eigenvalues (a second pass) instead of K-FAC's.
        progress: tqdm bars for the passes.
        partial: factor the covered layers of θ_S alone (:func:`kronecker_layers`); products
            and inverses are then zero on the other parameters.
        sample_sums: under ``torch.distributed``, ``train`` is this rank's shard and the sums
            over samples (covariances, counts, eigenvalue corrections) are all-reduced and the
            eigenbases taken from rank 0 (:class:`~fastinfluence.distributed.SampleSums`), so
            every rank holds the factors of the whole training set; ``None`` in one process.
    """

    def __init__(self, fmodel: FunctionalModel, train: LabelledData, eigen_corrected: bool,
                 progress: bool = False, partial: bool = False,
                 sample_sums: SampleSums | None = None) -> None:
        self.fmodel = fmodel
        self.layers = kronecker_layers(fmodel, partial)
        self.eigen_corrected = eigen_corrected
        self.sample_sums = sample_sums
        self.fit(train, progress)

    def _total(self, local: torch.Tensor) -> torch.Tensor:
        """A sum over this process's samples, summed over every rank's."""
        return local if self.sample_sums is None else self.sample_sums.total(local)

    def _agreed(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (itself in one process)."""
        return tensor if self.sample_sums is None else self.sample_sums.agree(tensor)

    def fit(self, train: LabelledData, progress: bool = False) -> None:
        """Factors from one pass over ``train``; eigenbases; EK-FAC eigenvalues from a second.

        The factors are accumulated and decomposed in float64 whatever the model's dtype: they
        are rank-deficient for small data sets, where float32 ``eigh`` fails to converge. The
        bases are then used in the model's dtype."""
        dtype, device = self.fmodel.dtype, self.fmodel.device
        wide = torch.float64
        for layer in self.layers:
            layer.activations = torch.zeros(layer.in_features, layer.in_features, dtype=wide,
                                            device=device)
            layer.gradients = torch.zeros(layer.out_features, layer.out_features, dtype=wide,
                                          device=device)
        pass_batch = factor_pass_batch(self.fmodel, self.layers, train)
        count = 0
        for inputs, grads in self._passes(train, progress, "K-FAC factors", pass_batch):
            count += len(next(iter(inputs.values())))
            for layer in self.layers:
                g = grads[layer.name]  # [C, B, T, out]
                layer.activations += _input_moments(layer, inputs[layer.name]).to(wide)
                flat = g.reshape(-1, g.shape[-1])
                layer.gradients += (flat.T @ flat).to(wide) / g.shape[2]
        count = int(self._total(torch.tensor(count, dtype=wide, device=device)))
        for layer in self.layers:
            layer.activations = self._total(layer.activations) / count
            layer.gradients = self._total(layer.gradients) / count
            values_a, basis_a = map(self._agreed, torch.linalg.eigh(layer.activations))
            values_s, basis_s = map(self._agreed, torch.linalg.eigh(layer.gradients))
            product = values_s.clamp_min(0)[:, None] * values_a.clamp_min(0)[None, :]
            layer.eigen = (basis_a.to(dtype), basis_s.to(dtype), product.to(dtype))
        if not self.eigen_corrected:
            return
        corrected = {layer.name: torch.zeros_like(layer.eigen[2]) for layer in self.layers}
        for inputs, grads in self._passes(train, progress, "EK-FAC eigenvalues", pass_batch):
            for layer in self.layers:
                corrected[layer.name] += _eigen_corrections(layer, inputs[layer.name],
                                                            grads[layer.name])
        for layer in self.layers:
            layer.eigen = (layer.eigen[0], layer.eigen[1],
                           self._total(corrected[layer.name]) / count)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """The factored curvature times each row of ``vectors`` ``[k, p]``."""
        return self._apply(vectors, lambda values: values)

    def inverse(self, vectors: torch.Tensor, damping: float) -> torch.Tensor:
        """``(G + λI)^{-1}`` of the factored curvature times each row of ``vectors``."""
        return self._apply(vectors, lambda values: 1.0 / (values + damping))

    def _apply(self, vectors: torch.Tensor, spectrum) -> torch.Tensor:
        out = torch.zeros_like(vectors)  # parameters outside the layers (partial) stay zero
        for layer in self.layers:
            basis_a, basis_s, values = layer.eigen
            matrix = self._matrix(layer, vectors)
            rotated = basis_s.T @ matrix @ basis_a
            self._write(layer, basis_s @ (rotated * spectrum(values)) @ basis_a.T, out)
        return out

    def _matrix(self, layer: KroneckerLayer, vectors: torch.Tensor) -> torch.Tensor:
        """The rows of ``vectors`` as the layer's ``[k, out, in (+1)]`` matrices."""
        start = layer.offsets[0]
        size = layer.module.weight.numel()
        weight = vectors[:, start:start + size]
        if layer.rule.transposed:
            weight = weight.reshape(len(vectors), -1, layer.out_features).transpose(1, 2)
        else:
            weight = weight.reshape(len(vectors), layer.out_features, -1)
        if not layer.bias:
            return weight
        bias = vectors[:, layer.offsets[1]:layer.offsets[1] + layer.out_features]
        return torch.cat([weight, bias[:, :, None]], dim=2)

    def _write(self, layer: KroneckerLayer, matrix: torch.Tensor, out: torch.Tensor) -> None:
        start = layer.offsets[0]
        size = layer.module.weight.numel()
        weight = matrix[:, :, :layer.in_features - int(bool(layer.bias))]
        if layer.rule.transposed:
            weight = weight.transpose(1, 2)
        out[:, start:start + size] = weight.reshape(len(out), -1)
        if layer.bias:
            out[:, layer.offsets[1]:layer.offsets[1] + layer.out_features] = matrix[:, :, -1]

    def _passes(self, data: LabelledData, progress: bool, what: str, pass_batch: int | None):
        """:func:`layer_passes` of this curvature's layers."""
        return layer_passes(self.fmodel, self.layers, data, progress, what,
                            pass_batch=pass_batch)


def hessian_root_columns(fmodel: FunctionalModel, logits: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """The columns ``r_c`` ``[C, B, ...]`` of the loss Hessian's square root in the model
    output (its PSD part): K-FAC's output-gradient directions; ``C − 1`` of them for softmax
    cross-entropy (``FunctionalModel.loss_hessian_roots(minimal=True)``), whose Hessian has
    rank ``C − 1``.

    Every factor is a sum over the columns of products of two terms linear in ``r_c``
    (``S = Σ_c g_c g_cᵀ``, EK-FAC's ``Σ_c (Q_Sᵀ G_c Q_A)²`` entrywise), hence unchanged by any
    other root ``R U`` (``U`` orthogonal) of the same Hessian ``R Rᵀ``: fewer columns are one
    backward pass fewer per batch, the same factors."""
    return fmodel.loss_hessian_roots(logits.detach(), y, minimal=True)[0]


FACTOR_PASS_BUDGET = 32 * 2**20
"""Bytes of one pass batch's largest layer patches and every layer's output gradients in a
K-FAC pass on the CPU (:func:`factor_pass_batch`)."""


def factor_pass_batch(fmodel: FunctionalModel, layers: list[KroneckerLayer],
                      data: LabelledData) -> int | None:
    """Samples per forward/backward of the factor passes: on the CPU the largest power of two
    whose largest layer's input patches plus every layer's output gradients fit
    :data:`FACTOR_PASS_BUDGET` (measured on one sample); ``None`` (the data's own batches)
    elsewhere.

    A convolution's patches are ``k²`` times its input, so the data's batches, sized for
    activations, make the passes memory-bound: on the residual CNN of ``bench_peers`` at 32²
    (one thread) batches of 256 took 1.4 GB and 4.6 s for 256 samples, batches of 16 0.45 GB
    and 3.0 s. The batch changes the factors by rounding only."""
    if fmodel.device.type != "cpu":
        return None
    inputs, grads = next(layer_passes(fmodel, layers, data.subset(torch.arange(1)), False, ""))
    patches = max(input_patches(layer, inputs[layer.name]).numel() for layer in layers)
    sample_bytes = (patches + sum(g.numel() for g in grads.values())) * fmodel.dtype.itemsize
    fitting = max(1, FACTOR_PASS_BUDGET // sample_bytes)
    return 2 ** (fitting.bit_length() - 1)


def layer_passes(fmodel: FunctionalModel, layers: list[KroneckerLayer], data: LabelledData,
                 progress: bool, what: str,
                 columns: Callable[[FunctionalModel, torch.Tensor, torch.Tensor], torch.Tensor]
                 = hessian_root_columns, pass_batch: int | None = None):
    """Per batch: every layer's input ``[B, ...]`` (as the layer received it; its patches are
    :func:`input_patches`, taken by the caller one layer at a time, since a convolution's are
    ``T·k²`` times its input) and the output gradients ``[C, B, T, out]`` of ``logits · r_c``
    for each column ``r_c`` ``[B, ...]`` of ``columns(fmodel, logits, y)`` (default: the loss
    Hessian's square root; the gradient store also asks for ``∂l/∂z``), read through the
    layers' K-FAC rules by forward hooks on one forward and one backward per column.
    ``pass_batch``: split the data's batches into pieces of at most this many samples."""
    batches = progress_bar(data.batches(fmodel.device, fmodel.dtype), progress, what,
                           data.num_batches())
    for x, y in _pieces(batches, pass_batch):
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}
        hooks = [layer.module.register_forward_hook(_capture(layer, inputs, outputs))
                 for layer in layers]
        try:
            theta = fmodel.theta.detach().requires_grad_(True)
            logits = fmodel.logits(theta, x)
        finally:
            for hook in hooks:
                hook.remove()
        if not isinstance(logits, torch.Tensor) or logits.ndim < 2:
            raise ValueError("K-FAC needs [batch, ...] model outputs (pick a tensor with "
                             "output=)")
        unseen = [layer.name for layer in layers if layer.name not in inputs]
        if unseen:
            raise ValueError(
                f"hessian='kfac'/'ekfac': the forward of {unseen[:6]} never ran (the model "
                "reads their weights directly, as nn.MultiheadAttention does its out_proj), "
                "so their factors cannot be taken: leave them out of params"
            )
        unbatched = [name for name, a in inputs.items() if len(a) != len(y)]
        if unbatched:  # e.g. a sequence-first transformer's [L, B, d]: samples mixed in T
            raise ValueError(
                f"hessian='kfac'/'ekfac' needs the samples on the first dimension of each "
                f"layer's input; {unbatched[:6]} read inputs of shape "
                f"{tuple(inputs[unbatched[0]].shape)} in a batch of {len(y)} (a "
                "sequence-first transformer? use batch_first=True)"
            )
        directions = columns(fmodel, logits, y)
        names = [layer.name for layer in layers]
        grads: dict[str, torch.Tensor] = {}
        for index, column in enumerate(directions):
            pieces = torch.autograd.grad(logits, [outputs[n] for n in names], column,
                                         retain_graph=index + 1 < len(directions))
            for layer, piece in zip(layers, pieces, strict=True):
                positions = layer.rule.positions(piece)  # [B, T, out]
                if layer.name not in grads:  # one copy per column, into the stacked tensor
                    grads[layer.name] = positions.new_empty(len(directions), *positions.shape)
                grads[layer.name][index] = positions
        yield {name: a.detach() for name, a in inputs.items()}, grads


def _pieces(batches, size: int | None):
    """Each ``(x, y)`` of ``batches`` in consecutive pieces of at most ``size`` samples."""
    for x, y in batches:
        if size is None or len(y) <= size:
            yield x, y
            continue
        for start in range(0, len(y), size):
            rows = slice(start, start + size)
            yield map_inputs(lambda tensor, rows=rows: tensor[rows], x), y[rows]


def _capture(layer: KroneckerLayer, inputs: dict, outputs: dict):
    def hook(_module, args, output) -> None:
        if layer.name in inputs:  # the factors are of one call's inputs and outputs
            raise ValueError(f"hessian='kfac'/'ekfac' needs each layer called once per "
                             f"forward; {layer.name!r} ran twice")
        inputs[layer.name] = args[0]
        outputs[layer.name] = output

    return hook


def input_patches(layer: KroneckerLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input patches ``a_t`` ``[B, T, in]`` of its input ``x``, without the bias
    column (a constant 1, which the callers add in closed form rather than copying the
    patches to append it)."""
    return layer.rule.patches(layer.module, x)


MOMENT_BLOCK_BYTES = 2**26
"""At most this many bytes of per-sample ``[in, in]`` products at a time in
:func:`_input_moments` (64 MiB)."""


def _input_moments(layer: KroneckerLayer, x: torch.Tensor) -> torch.Tensor:
    """``Σ_b Σ_t a_bt a_btᵀ`` ``[in (+1), in (+1)]`` over a batch, the bias column's 1 included.

    Contiguous patches (a Linear's) are one flat ``[B·T, in]`` product. A convolution's are a
    transposed view of ``unfold``'s ``[B, in, T]``: with more positions than inputs, a batched
    product of each sample's ``[in, T]`` with its transpose reads that layout as it is (BLAS
    transposes), where the flat product would copy it first (residual CNN at 32², ``T`` =
    1,024, ``in`` = 145: 3× slower with the copy); the per-sample ``[in, in]`` products are
    taken a block of samples at a time and summed. With fewer positions than inputs (a deep
    convolution) writing ``B`` products of ``[in, in]`` costs more than the copy: flat."""
    a = input_patches(layer, x)
    batch, positions, width = a.shape
    if a.is_contiguous() or positions < width:
        flat = a.reshape(batch * positions, width)  # a copy when not contiguous
        second = flat.T @ flat
    else:
        block = max(1, MOMENT_BLOCK_BYTES // (width * width * a.element_size()))
        second = sum(torch.bmm(part.transpose(1, 2), part).sum(dim=0)
                     for part in a.split(block))
    if not layer.bias:
        return second
    column = a.sum(dim=(0, 1))
    corner = column.new_tensor([[batch * positions]])
    return torch.cat([torch.cat([second, column[:, None]], dim=1),
                      torch.cat([column[None], corner], dim=1)])


def _eigen_corrections(layer: KroneckerLayer, x: torch.Tensor,
                       grads: torch.Tensor) -> torch.Tensor:
    """``Σ_b Σ_c (Q_Sᵀ G_bc Q_A)²`` ``[out, in (+1)]`` over a batch, ``G_bc = Σ_t g_bct ã_btᵀ``
    each sample's gradient matrix of column ``c`` (``ã`` the patches with the bias's 1).

    Two orders of the same products, whichever takes fewer multiply-adds: the per-sample
    matrices, then rotated (``C·(out²·in + out·in²)`` per sample on top of the
    ``C·T·out·in`` of forming them: cheap when the positions ``T`` are many and ``in`` is
    small), or the patches and gradients rotated first, ``ã Q_A`` and ``g Q_S``
    (``T·in² + C·T·out²``, then ``C·T·out·in``: cheap when ``T`` is small and ``in`` large, a
    deep convolution's or a Linear's)."""
    basis_a, basis_s, _ = layer.eigen
    patches = input_patches(layer, x)
    columns, _, positions, out = grads.shape
    width = layer.in_features
    forming = columns * positions * out * width
    matrices_first = forming + columns * (out * out * width + out * width * width)
    rotated_first = positions * width * width + columns * positions * out * out + forming
    if rotated_first < matrices_first:
        rotated = patches @ basis_a[:patches.shape[2]]  # [B, T, in (+1)]
        if layer.bias:  # the bias column's 1 times the basis's last row
            rotated += basis_a[-1]
        projected = torch.einsum("cbto,bti->cboi", grads @ basis_s, rotated)
    else:
        projected = basis_s.T @ per_sample_matrices(layer, x, grads) @ basis_a
    return (projected * projected).sum(dim=(0, 1))


def per_sample_matrices(layer: KroneckerLayer, x: torch.Tensor,
                        grads: torch.Tensor) -> torch.Tensor:
    """``Σ_t g_ct a_tᵀ`` ``[C, B, out, in (+1)]``: each sample's gradient of each column as the
    layer's matrix (the bias column is ``Σ_t g_ct``), from its input ``x`` and output
    gradients ``grads`` ``[C, B, T, out]``."""
    weight = torch.einsum("cbto,bti->cboi", grads, input_patches(layer, x))
    if not layer.bias:
        return weight
    return torch.cat([weight, grads.sum(dim=2)[..., None]], dim=3)
