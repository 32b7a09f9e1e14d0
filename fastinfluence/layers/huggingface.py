"""Hugging Face ``transformers`` layers: ``Conv1D`` (GPT-2's affine layer ``y = x W + b``, its
weight stored ``[in, out]``), K-FAC's factors as a Linear's with the weight transposed.

``transformers`` is optional and never imported here: a model holding a ``Conv1D`` has
imported ``transformers.pytorch_utils`` already, so :func:`register_loaded` (which K-FAC calls
before reading a model's layers) registers the rule from the loaded module when there is one.
"""

from __future__ import annotations

import sys

from fastinfluence.layers.linear import LinearFactors
from fastinfluence.layers.registry import layer_rules, register_layer

CONV1D_MODULE = "transformers.pytorch_utils"
"""Where ``transformers`` defines ``Conv1D``."""


class Conv1DFactors(LinearFactors):
    """``Conv1D`` on ``[B, ..., in]``: a Linear's patches and positions (every sequence
    position a position ``t``), with the ``[in, out]`` weight read transposed."""

    transposed = True


def register_loaded() -> None:
    """Register ``Conv1D``'s K-FAC rule if ``transformers`` is loaded and it is not yet
    registered (a user's own registration of ``Conv1D`` stays)."""
    conv1d = getattr(sys.modules.get(CONV1D_MODULE), "Conv1D", None)
    if conv1d is not None and layer_rules(conv1d) is None:
        register_layer(conv1d, kfac=Conv1DFactors())
