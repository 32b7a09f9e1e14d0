"""The closed-form head runs only where it is the model's map (docs/design.md §3, item 3).

Each model below ends in an ``nn.Linear`` whose output is (or looks like) the model's output,
but the closed form ``z = W a + b`` with features ``a`` independent of ``(W, b)`` is not the
model: ``Influence`` must take the network path, say why in ``report.path_reason``, and agree
with the float64 Gauss-Newton oracle (the default curvature of networks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import mlp, relative_error
from torch import nn

import fastinfluence as fi
from fastinfluence import reference

DAMPING = 0.1


def data(seed: int, n: int, features: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator))


TRAIN, VAL = data(0, 24), data(1, 6)


def oracle_scores(model: nn.Module, params: list[nn.Parameter], curvature: torch.Tensor,
                  train=TRAIN, val=VAL) -> torch.Tensor:
    """``−∇l(z)ᵀ(C + λI)^{-1}∇L(val)`` from an explicit curvature matrix ``C``."""
    s = reference.ihvp_direct(curvature, reference.mean_loss_grad(model, params, *val), DAMPING)
    return -(reference.per_sample_grads(model, params, *train) @ s)


def check_network_path(model: nn.Module, head: nn.Linear, reason: str, train=TRAIN,
                       val=VAL) -> None:
    inf = fi.Influence(model.double().eval(), train, val, damping=DAMPING)
    params = list(head.parameters())
    expected = oracle_scores(model, params, reference.gauss_newton(model, params, *train),
                             train, val)
    assert relative_error(inf.scores(), expected) < 1e-9
    assert inf.report.path == "autograd"
    assert inf.report.path_reason is not None and reason in inf.report.path_reason, \
        inf.report.path_reason


class AppliedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(torch.tanh(self.body(x))))


def test_a_head_applied_twice_takes_the_network_path():
    model = AppliedTwice()
    check_network_path(model, model.fc, "runs 2 times")


class CosineLinear(nn.Linear):
    """A cosine classifier: scaled cosine similarity of the input and each weight row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4.0 * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1), self.bias)


def test_a_linear_subclass_with_its_own_forward_takes_the_network_path():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), CosineLinear(6, 3))
    check_network_path(model, model[2], "CosineLinear")


@pytest.mark.parametrize("kind", ["forward", "forward-pre", "global-forward"])
def test_a_hook_on_the_head_takes_the_network_path(kind):
    torch.manual_seed(0)
    model = mlp()
    head = model[2]
    handle: torch.utils.hooks.RemovableHandle
    if kind == "forward":  # temperature scaling
        handle = head.register_forward_hook(lambda _m, _inputs, out: out / 2.0)
    elif kind == "forward-pre":
        handle = head.register_forward_pre_hook(lambda _m, inputs: (inputs[0] * 3.0,))
    else:
        def temperature(module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor | None:
            return out / 2.0 if module is head else None

        handle = nn.modules.module.register_module_forward_hook(temperature)
    try:
        check_network_path(model, head, "hook")
    finally:
        handle.remove()


class InPlaceTemperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.body(x))).div_(2.0)


def test_an_in_place_op_on_the_logits_takes_the_network_path():
    model = InPlaceTemperature()
    check_network_path(model, model.fc, "in place")


class TiedHead(nn.Module):
    """The head is registered first and its weight is also the first layer's weight, so
    ``params="last"`` selects exactly the head's parameters, on which the features depend."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)
        self.first = nn.Linear(3, 3)
        self.first.weight = self.head.weight
        self.middle = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def test_a_head_weight_tied_to_an_earlier_layer_takes_the_network_path():
    model = TiedHead()
    check_network_path(model, model.head, "first.weight", data(0, 24, features=3),
                       data(1, 6, features=3))


class BiasReadBeforeTheHead(nn.Module):
    """The head's bias also shifts the features, read as a tensor (no other module holds it:
    only the features' change with θ_S shows it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.body(x) + self.fc.bias))


def test_features_that_read_the_head_parameters_take_the_network_path():
    model = BiasReadBeforeTheHead()
    check_network_path(model, model.fc, "input changes with the head's own parameters")


def test_an_ordinary_head_takes_the_closed_form():
    torch.manual_seed(0)
    model = mlp().double().eval()
    inf = fi.Influence(model, TRAIN, VAL, damping=DAMPING)
    assert inf.report.path == "head-closed-form" and inf.report.path_reason is None
    params = list(model[2].parameters())
    # the head's exact Hessian, which equals its Gauss-Newton matrix
    expected = oracle_scores(model, params, reference.hessian(model, params, *TRAIN))
    assert relative_error(inf.scores(), expected) < 1e-10
