"""Gradient, Hessian-vector product, explicit Hessian and scores of a softmax-cross-entropy
Linear head, in closed form (the engine's ``HeadBackend``, :mod:`.backends`).

With features ``A`` [n, d] entering the head, probabilities ``P`` [n, C] and one-hot labels
``Y``, and the head's parameters viewed as ``(W [C, d], b [C])``:

* per-sample gradient: ``∇_W l_i = (p_i − y_i) a_iᵀ``, ``∇_b l_i = p_i − y_i``;
* Hessian of the mean loss times ``V = (V_W, V_b)``: with ``U = A V_Wᵀ + V_b`` and
  ``R = P⊙U − P⊙rowsum(P⊙U)``, ``H V = (Rᵀ A / n, colsum(R) / n)``;
* score along ``S = (S_W, S_b)``: ``sᵀ∇l_i = (p_i − y_i)ᵀ (S_W a_i + S_b)``.

The Gauss-Newton matrix of this head is its exact Hessian (the logits are linear in θ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastinfluence import ops


@dataclass
class HeadFeatures:
    """Cached inputs ``A`` of the head, softmax outputs ``P`` and labels ``y`` of a data set."""

    features: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, indices: torch.Tensor) -> HeadFeatures:
        """The rows at ``indices`` (repeats allowed)."""
        return HeadFeatures(self.features[indices], self.probs[indices], self.labels[indices])

    def residuals(self) -> torch.Tensor:
        """``P − Y``, the gradient of each sample's loss w.r.t. its logits."""
        onehot = F.one_hot(self.labels, self.probs.shape[1]).to(self.probs.dtype)
        return self.probs - onehot


class HeadLayout:
    """Maps flat θ_S vectors ``[k, p]`` to ``(W [k, C, d], b [k, C] or None)`` and back."""

    def __init__(self, num_classes: int, num_features: int, has_bias: bool) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.has_bias = has_bias

    @property
    def dim(self) -> int:
        """``p = C·(d + 1)`` with a bias, ``C·d`` without."""
        return self.num_classes * (self.num_features + int(self.has_bias))

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[..., p]`` into ``W [..., C, d]`` and ``b [..., C]`` (``None`` without bias)."""
        count = self.num_classes * self.num_features
        weight = flat[..., :count].reshape(*flat.shape[:-1], self.num_classes, self.num_features)
        bias = flat[..., count:] if self.has_bias else None
        return weight, bias

    def join(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The inverse of :meth:`split`: all of ``W`` (row-major), then ``b``."""
        flat = weight.reshape(*weight.shape[:-2], -1)
        return flat if bias is None else torch.cat([flat, bias], dim=-1)


def mean_gradient(data: HeadFeatures, layout: HeadLayout) -> torch.Tensor:
    """∇ of the mean loss over ``data``, flat ``[p]``."""
    residuals = data.residuals()
    weight = residuals.T @ data.features / len(data)
    bias = residuals.mean(dim=0) if layout.has_bias else None
    return layout.join(weight, bias)


def per_sample_gradients(data: HeadFeatures, layout: HeadLayout) -> torch.Tensor:
    """Per-sample gradients, ``[n, p]`` (small heads only: this materialises them)."""
    residuals = data.residuals()
    weight = residuals[:, :, None] * data.features[:, None, :]
    return layout.join(weight, residuals if layout.has_bias else None)


def hvp(data: HeadFeatures, layout: HeadLayout, vectors: torch.Tensor) -> torch.Tensor:
    """``H V`` for flat ``vectors`` [k, p] (no damping)."""
    weights, biases = layout.split(vectors)
    hw, hb = ops.head_hvp(data.features, data.probs, weights, biases, 0.0)
    return layout.join(hw, hb)


def dense_hessian(data: HeadFeatures, layout: HeadLayout) -> torch.Tensor:
    """The explicit ``[p, p]`` Hessian, block by block:
    ``H_cc' = Ãᵀ diag(p_c δ_cc' − p_c p_c') Ã / n`` with ``Ã = [A, 1]``; the flat order is all
    of ``W`` (row-major), then ``b``."""
    probs = data.probs
    features = data.features
    if layout.has_bias:
        features = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
    classes = layout.num_classes
    width = features.shape[1]
    blocks = features.new_empty(classes, width, classes, width)
    for c in range(classes):
        for c2 in range(c, classes):
            curvature = probs[:, c] * (float(c == c2) - probs[:, c2])
            block = (features * curvature[:, None]).T @ features / len(features)
            blocks[c, :, c2, :] = block
            blocks[c2, :, c, :] = block.T
    full = blocks.reshape(classes * width, classes * width)
    if not layout.has_bias:
        return full
    # Reorder from class-major [(W_c, b_c) for c] to the parameter order [W..., b...].
    index = torch.arange(classes * width, device=full.device).reshape(classes, width)
    order = torch.cat([index[:, :-1].reshape(-1), index[:, -1]])
    return full[order][:, order]


def scores(data: HeadFeatures, layout: HeadLayout, directions: torch.Tensor) -> torch.Tensor:
    """``−sᵀ∇l_i`` for each sample and each flat direction ``s`` in ``directions`` [k, p];
    returns ``[n, k]``."""
    weights, biases = layout.split(directions)
    return ops.head_scores(data.features, data.probs, data.labels, weights, biases)
