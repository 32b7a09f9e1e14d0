"""The model as a pure function of the flat selected parameters θ_S.

Influence is computed on a snapshot of the model's weights, in eval mode, through
``torch.func.functional_call``: the caller's module is never written to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.params import ParameterSelection

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_sample(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: softmax cross-entropy on logits, one value per sample."""
    return F.cross_entropy(logits, targets, reduction="none")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class FunctionalModel:
    """Logits and per-sample losses as functions of a flat parameter vector θ_S.

    Args:
        model: the caller's module (only read).
        selection: which parameters form θ_S.
        loss_fn: ``loss_fn(logits, y) -> [batch]``; ``None`` for cross-entropy.
        device: where the snapshot lives and the work runs.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: ParameterSelection,
        loss_fn: LossFn | None,
        device: torch.device,
    ) -> None:
        self.model = model
        self.selection = selection
        self.uses_cross_entropy = loss_fn is None
        self.loss_fn = cross_entropy_per_sample if loss_fn is None else loss_fn
        self.device = device
        selected = set(selection.names)
        with torch.no_grad():
            named = dict(model.named_parameters())
            self.theta = selection.flatten([named[n].detach().to(device) for n in selection.names])
            self.theta = self.theta.clone()
            self.fixed = {
                name: tensor.detach().to(device).clone()
                for name, tensor in [*named.items(), *model.named_buffers()]
                if name not in selected
            }
        self.dtype = self.theta.dtype

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def tensors(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by name, the selected ones taken from ``theta``."""
        return {**self.fixed, **self.selection.unflatten(theta)}

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.tensors(theta), (x,))

    def losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_sample(self.logits(theta, x), y)

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = self.loss_fn(logits, y)
        if values.shape != (len(logits),):
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({len(logits)},); got "
                f"{tuple(values.shape)} (use reduction='none')"
            )
        return values

    def loss_tangents(
        self, logits: torch.Tensor, y: torch.Tensor, tangents: torch.Tensor
    ) -> torch.Tensor:
        """∂l/∂z · u for each sample and each tangent ``u`` in ``tangents`` [k, batch, C];
        ``[k, batch]``."""
        if self.uses_cross_entropy:
            residual = torch.softmax(logits, dim=-1)
            residual[torch.arange(len(y), device=y.device), y] -= 1
            return (tangents * residual).sum(dim=-1)

        def one(u: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda z: self.per_sample(z, y), (logits,), (u,))[1]

        return torch.func.vmap(one)(tangents)

    def loss_hessian_vp(
        self, logits: torch.Tensor, y: torch.Tensor, tangents: torch.Tensor
    ) -> torch.Tensor:
        """∂²l/∂z² · u for each sample and each tangent ``u`` in ``tangents`` [k, batch, C]."""
        if self.uses_cross_entropy:
            probs = torch.softmax(logits, dim=-1)
            weighted = probs * tangents
            return weighted - probs * weighted.sum(dim=-1, keepdim=True)

        def summed(z: torch.Tensor) -> torch.Tensor:
            return self.per_sample(z, y).sum()

        grad_z = torch.func.grad(summed)

        def one(u: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(grad_z, (logits,), (u,))[1]

        return torch.func.vmap(one)(tangents)
