"""The engine's one ``torch.fx`` tracer (the fused tangent pass and the head's feature pass
both read a model through it)."""

from __future__ import annotations

from torch import fx, nn


def trace(model: nn.Module) -> fx.GraphModule | str:
    """``model`` traced by ``torch.fx.symbolic_trace``, or why it does not trace."""
    try:
        return fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: the general path
        return f"torch.fx could not trace the model ({type(error).__name__}: {error})"
