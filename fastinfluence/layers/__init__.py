"""The layer registry: per layer type, its fused-tangent rule, its K-FAC factor rule and its
inference fold (:mod:`fastinfluence.layers.registry`), one file per layer family.

Adding a layer is one registration in its family's file (or in user code, before scoring)::

    from fastinfluence.layers import Rule, per_direction, register_layer

    @register_layer(nn.LeakyReLU)
    class LeakyReLURule(Rule):
        ...

The fused tangent pass (:mod:`fastinfluence.tangent`), K-FAC/EK-FAC
(:mod:`fastinfluence.hessian.kfac`) and the head's feature pass
(:mod:`fastinfluence.feature_pass`) all read it.
"""

# The families register on import (conv imports linear first: K-FAC's messages list Linear,
# then Conv2d); huggingface registers transformers' Conv1D once transformers is loaded.
from fastinfluence.layers import (  # noqa: F401
    activation,
    attention,
    conv,
    embedding,
    huggingface,
    linear,
    norm,
    pooling,
    shape,
)
from fastinfluence.layers.registry import (
    KroneckerRule,
    LayerRules,
    NotCovered,
    Point,
    Rule,
    Site,
    Step,
    layer_rules,
    per_direction,
    register_layer,
    registered,
    temporary_registrations,
)

__all__ = [
    "KroneckerRule",
    "LayerRules",
    "NotCovered",
    "Point",
    "Rule",
    "Site",
    "Step",
    "layer_rules",
    "per_direction",
    "register_layer",
    "registered",
    "temporary_registrations",
]
