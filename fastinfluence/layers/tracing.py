"""The engine's one ``torch.fx`` tracer (the fused tangent pass and the head's feature pass
both read a model through it)."""

from __future__ import annotations

from torch import fx, nn

from fastinfluence.layers.registry import layer_rules


class RegisteredLeaves(fx.Tracer):
    """torch.fx's tracer, which keeps ``torch.nn``'s modules as single nodes, keeping as one
    node too every module whose exact type has a registered tangent rule (such as
    :class:`fastinfluence.layers.attention.ClassTokenAndPositions`): its rule runs it whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        entry = layer_rules(type(m))
        if entry is not None and entry.tangent is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule | str:
    """``model`` traced by ``torch.fx`` (:class:`RegisteredLeaves`), or why it does not
    trace."""
    try:
        graph = RegisteredLeaves().trace(model)
        return fx.GraphModule(model, graph, type(model).__name__)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: the general path
        return f"torch.fx could not trace the model ({type(error).__name__}: {error})"
