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

import torch
from torch import nn

from fastinfluence.functional import FunctionalModel
from fastinfluence.labelled_data import LabelledData
from fastinfluence.layers.huggingface import register_loaded
from fastinfluence.layers.registry import KroneckerRule, NotCovered, kfac_rule, registered
from fastinfluence.progress import progress_bar

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
            f"hessian='kfac'/'ekfac' covers the parameters of layers with K-FAC factors "
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
    """

    def __init__(self, fmodel: FunctionalModel, train: LabelledData, eigen_corrected: bool,
                 progress: bool = False, partial: bool = False) -> None:
        self.fmodel = fmodel
        self.layers = kronecker_layers(fmodel, partial)
        self.eigen_corrected = eigen_corrected
        self.fit(train, progress)

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
        count = 0
        for patches, grads in self._passes(train, progress, "K-FAC factors"):
            count += len(next(iter(patches.values())))
            for layer in self.layers:
                a, g = patches[layer.name], grads[layer.name]  # [B, T, in], [C, B, T, out]
                layer.activations += torch.einsum("bti,btj->ij", a, a).to(wide)
                layer.gradients += torch.einsum("cbti,cbtj->ij", g, g).to(wide) / a.shape[1]
        for layer in self.layers:
            layer.activations /= count
            layer.gradients /= count
            values_a, basis_a = torch.linalg.eigh(layer.activations)
            values_s, basis_s = torch.linalg.eigh(layer.gradients)
            product = values_s.clamp_min(0)[:, None] * values_a.clamp_min(0)[None, :]
            layer.eigen = (basis_a.to(dtype), basis_s.to(dtype), product.to(dtype))
        if not self.eigen_corrected:
            return
        corrected = {layer.name: torch.zeros_like(layer.eigen[2]) for layer in self.layers}
        for patches, grads in self._passes(train, progress, "EK-FAC eigenvalues"):
            for layer in self.layers:
                basis_a, basis_s, _ = layer.eigen
                per_sample = torch.einsum("cbto,bti->cboi", grads[layer.name], patches[layer.name])
                projected = basis_s.T @ per_sample @ basis_a
                corrected[layer.name] += (projected * projected).sum(dim=(0, 1))
        for layer in self.layers:
            layer.eigen = (layer.eigen[0], layer.eigen[1], corrected[layer.name] / count)

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

    def _passes(self, data: LabelledData, progress: bool, what: str):
        """:func:`layer_passes` of this curvature's layers."""
        return layer_passes(self.fmodel, self.layers, data, progress, what)


def hessian_root_columns(fmodel: FunctionalModel, logits: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """The columns ``r_c`` ``[C, B, ...]`` of the loss Hessian's square root in the model
    output (its PSD part): K-FAC's output-gradient directions."""
    return fmodel.loss_hessian_roots(logits.detach(), y)[0]


def layer_passes(fmodel: FunctionalModel, layers: list[KroneckerLayer], data: LabelledData,
                 progress: bool, what: str,
                 columns: Callable[[FunctionalModel, torch.Tensor, torch.Tensor], torch.Tensor]
                 = hessian_root_columns):
    """Per batch: every layer's input patches ``[B, T, in (+1)]`` and the output gradients
    ``[C, B, T, out]`` of ``logits · r_c`` for each column ``r_c`` ``[B, ...]`` of
    ``columns(fmodel, logits, y)`` (default: the loss Hessian's square root; the gradient
    store also asks for ``∂l/∂z``), read through the layers' K-FAC rules by forward hooks on
    one forward and one backward per column."""
    batches = progress_bar(data.batches(fmodel.device, fmodel.dtype), progress, what,
                           data.num_batches())
    for x, y in batches:
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
        by_name = {layer.name: layer for layer in layers}
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for column in directions:
            pieces = torch.autograd.grad(logits, [outputs[n] for n in names], column,
                                         retain_graph=True)
            for name, piece in zip(names, pieces, strict=True):
                grads[name].append(by_name[name].rule.positions(piece))
        patches = {layer.name: _patches(layer, inputs[layer.name].detach())
                   for layer in layers}
        yield patches, {name: torch.stack(values) for name, values in grads.items()}


def _capture(layer: KroneckerLayer, inputs: dict, outputs: dict):
    def hook(_module, args, output) -> None:
        if layer.name in inputs:  # the factors are of one call's inputs and outputs
            raise ValueError(f"hessian='kfac'/'ekfac' needs each layer called once per "
                             f"forward; {layer.name!r} ran twice")
        inputs[layer.name] = args[0]
        outputs[layer.name] = output

    return hook


def _patches(layer: KroneckerLayer, x: torch.Tensor) -> torch.Tensor:
    patches = layer.rule.patches(layer.module, x)
    if layer.bias:
        ones = patches.new_ones(*patches.shape[:2], 1)
        patches = torch.cat([patches, ones], dim=2)
    return patches
