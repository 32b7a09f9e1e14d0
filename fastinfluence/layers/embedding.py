"""Embeddings: ``nn.Embedding`` (tangent rule; K-FAC as a Linear over one-hot inputs)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import KroneckerRule, Options, Rule, Site, register_layer

KFAC_VOCABULARY = 4096
"""The most embeddings K-FAC factors: its activation factor is a dense ``N × N`` matrix
(128 MiB in float64 at 4,096), decomposed with ``eigh``."""


class EmbeddingFactors(KroneckerRule):
    """``y_t = W[x_t] = Wᵀ e_{x_t}``: a Linear with weight ``Wᵀ`` over one-hot inputs (whose
    activation factor is the diagonal of token frequencies). A ``padding_idx`` token's one-hot
    is zero: autograd gives the padding row no gradient."""

    transposed = True

    def check(self, module):
        if module.num_embeddings > KFAC_VOCABULARY:
            return (f"K-FAC's activation factor of an Embedding is a dense "
                    f"num_embeddings² matrix; {module.num_embeddings} embeddings exceed "
                    f"{KFAC_VOCABULARY}: leave it out of params")
        return None

    def patches(self, module, x):
        one_hot = F.one_hot(x.reshape(len(x), -1), module.num_embeddings)
        if module.padding_idx is not None:
            one_hot[..., module.padding_idx] = 0
        return one_hot.to(module.weight.dtype)

    def positions(self, gradient):
        return gradient.reshape(len(gradient), -1, gradient.shape[-1])


@register_layer(nn.Embedding, kfac=EmbeddingFactors())
class Embedding(Rule):
    """``y = W[x]`` for integer indices ``x`` (which have no tangent): ``dy = dW[x]``."""

    kind = "embedding"
    reads = ("weight",)

    def configure(self, site: Site) -> Options | str:
        if site.module.max_norm is not None:
            return f"{site.name}: Embedding(max_norm=...) renormalises its weight in place"
        if site.module.padding_idx is not None:  # forward mode moves the padding row too
            return (f"{site.name}: Embedding(padding_idx=...): autograd gives the padding row "
                    f"no gradient, forward mode does")
        return {}

    def run(self, step, at, x, dx):
        module = step.module
        y = F.embedding(x, step.tensor(at, "weight"), module.padding_idx)
        dweight = step.tangent(at, "weight")
        if dweight is None:
            return y, None
        return y, dweight[:, x].reshape(at.k * len(x), *y.shape[1:])
