"""Embeddings: ``nn.Embedding`` (tangent rule; K-FAC declined)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import NotCovered, Options, Rule, Site, register_layer


@register_layer(nn.Embedding, kfac=NotCovered(
    "an Embedding is a Linear over one-hot inputs, but K-FAC's factors for it (an activation "
    "factor over the whole vocabulary) are not implemented: leave it out of params"))
class Embedding(Rule):
    """``y = W[x]`` for integer indices ``x`` (which have no tangent): ``dy = dW[x]``."""

    kind = "embedding"
    reads = ("weight",)

    def configure(self, site: Site) -> Options | str:
        if site.module.max_norm is not None:
            return f"{site.name}: Embedding(max_norm=...) renormalises its weight in place"
        return {}

    def run(self, step, at, x, dx):
        module = step.module
        y = F.embedding(x, step.tensor(at, "weight"), module.padding_idx)
        dweight = step.tangent(at, "weight")
        if dweight is None:
            return y, None
        return y, dweight[:, x].reshape(at.k * len(x), *y.shape[1:])
