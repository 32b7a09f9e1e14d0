"""``select_parameters``: every form of ``params``, its errors, and "last" by execution order."""

from __future__ import annotations

import pytest
import torch
from problems import TiedEncoderDecoder
from torch import nn

import fastinfluence as fi
from fastinfluence.params import select_parameters


class OutputRegisteredFirst(nn.Module):
    """The output layer is registered before the body, so registration order misleads."""

    def __init__(self) -> None:
        super().__init__()
        self.output = nn.Linear(6, 3)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(x))


class ScaledOutput(nn.Module):
    """The root owns a parameter applied after its children."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.temperature


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


EXAMPLE = torch.randn(2, 4)


def test_last_is_the_last_module_to_run_on_the_example():
    model = OutputRegisteredFirst()
    selection = select_parameters(model, "last", example=EXAMPLE)
    assert selection.names == ("output.weight", "output.bias")
    assert selection.head is model.output
    assert selection.shapes == (torch.Size([3, 6]), torch.Size([3]))
    assert selection.numel == 21


def test_last_without_an_example_follows_registration_order():
    model = OutputRegisteredFirst()
    assert select_parameters(model, "last").names == ("body.0.weight", "body.0.bias")


def test_last_can_be_the_root_modules_own_parameter():
    selection = select_parameters(ScaledOutput(), "last", example=EXAMPLE)
    assert selection.names == ("temperature",)
    assert selection.head is None


class TokenThenHead(nn.Module):
    """The root owns a token it uses first (as a ViT's class token); its forward wraps the
    head's, so it finishes last although the head's parameters are used last."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(4))
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x + self.token)))


def test_last_is_the_module_whose_parameter_is_used_last_not_an_enclosing_one():
    model = TokenThenHead()
    selection = select_parameters(model, "last", example=EXAMPLE)
    assert selection.names == ("head.weight", "head.bias")
    assert selection.head is model.head


def test_last_takes_the_running_module_of_a_parameter_used_functionally():
    """``MultiheadAttention`` hands ``out_proj``'s weight to one functional call without
    running ``out_proj``: the attention module's own parameters are taken, as before."""
    model = nn.MultiheadAttention(4, 2, batch_first=True)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x, need_weights=False)[0].sum(1)

    names = select_parameters(SelfAttention(), "last", example=torch.randn(2, 3, 4)).names
    assert names == ("attention.in_proj_weight", "attention.in_proj_bias")


def test_last_probe_runs_in_eval_mode_and_restores_the_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    select_parameters(model, "last", example=EXAMPLE)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


def test_last_skips_frozen_parameters_of_a_partly_frozen_module():
    model = mlp()
    model[2].bias.requires_grad_(False)
    assert select_parameters(model, "last", example=EXAMPLE).names == ("2.weight",)


@pytest.mark.parametrize("example", [None, EXAMPLE])
def test_a_frozen_last_module_is_an_error_not_skipped(example):
    model = OutputRegisteredFirst()
    model.output.requires_grad_(False)
    if example is None:
        model.body.requires_grad_(False)
        expected = "'body.0'"
    else:
        expected = "'output'"
    with pytest.raises(ValueError, match=f'params="last" found {expected}.*require grad.*"all"'):
        select_parameters(model, "last", example=example)


def test_all_takes_every_trainable_parameter_in_order():
    model = mlp()
    model[0].bias.requires_grad_(False)
    selection = select_parameters(model, "all")
    assert selection.names == ("0.weight", "2.weight", "2.bias")
    assert selection.head is None
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        select_parameters(model, "all")


def test_names_of_modules_and_parameters_in_model_order():
    model = mlp()
    assert select_parameters(model, ["2", "0"]).names == (
        "0.weight", "0.bias", "2.weight", "2.bias")
    assert select_parameters(model, ["2.bias", "0.weight"]).names == ("0.weight", "2.bias")
    selection = select_parameters(model, ["2"])
    assert selection.head is model[2]
    # The whole model by the empty name.
    assert len(select_parameters(model, [""]).names) == 4


def test_parameters_given_as_tensors():
    model = mlp()
    selection = select_parameters(model, [model[2].bias, model[0].weight])
    assert selection.names == ("0.weight", "2.bias")
    assert select_parameters(model, [model[2].weight, model[2].bias]).head is model[2]


def test_a_linear_without_bias_is_a_head_by_its_weight_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    selection = select_parameters(model, "last", example=EXAMPLE)
    assert selection.names == ("2.weight",) and selection.head is model[2]


@pytest.mark.parametrize(
    "params", ["last", ["decoder"], ["decoder.weight", "decoder.bias"], ["encoder.weight",
                                                                         "decoder.bias"]])
def test_a_tied_weight_is_selected_once_under_its_first_name_by_any_of_its_names(params):
    """``decoder.weight is encoder.weight``: the decoder uses 30 parameters, not its bias alone
    (``named_parameters()`` lists the shared tensor once, as ``encoder.weight``)."""
    model = TiedEncoderDecoder()
    selection = select_parameters(model, params, example=torch.randn(2, 5))
    assert selection.names == ("encoder.weight", "decoder.bias")
    assert selection.numel == 30
    assert selection.shared == {"encoder.weight": ("decoder.weight",)}
    assert selection.head is model.decoder  # by identity; probe_model refuses its closed form


def test_a_linear_whose_weight_another_module_uses_takes_no_closed_form():
    model = TiedEncoderDecoder(output_first=True)
    selection = select_parameters(model, "last", example=torch.randn(2, 5))
    assert selection.names == ("decoder.weight", "decoder.bias")
    assert selection.shared == {"decoder.weight": ("encoder.weight",)}
    data = (torch.randn(6, 5), torch.randint(0, 5, (6,)))
    report = fi.Influence(model, data, data).report
    assert report.path == "autograd" and "encoder.weight" in report.path_reason
    assert select_parameters(mlp(), "last", example=EXAMPLE).shared == {}


def test_a_module_registered_under_two_names_is_found_under_either_and_is_not_tied():
    model = nn.Module()
    model.body = mlp()
    model.output = model.body[2]  # an alias of one module: nothing else uses its weight
    for params in (["output"], ["output.weight", "body.2.bias"]):
        selection = select_parameters(model, params)
        assert selection.names == ("body.2.weight", "body.2.bias")
        assert selection.shared == {} and selection.head is model.output


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ("first", ValueError, "params must be"),
        ([], ValueError, "empty list"),
        (["nope"], ValueError, "no module or parameter named 'nope'"),
        (["1"], ValueError, "module '1' has no parameters"),
        ([nn.Parameter(torch.zeros(2))], ValueError, r"params\[0\] is not a parameter"),
        (["0", nn.Parameter(torch.zeros(2))], TypeError, "only module names or only"),
    ],
)
def test_bad_params_raise_clear_errors(params, error, message):
    with pytest.raises(error, match=message):
        select_parameters(mlp(), params)


def test_a_model_without_parameters_is_an_error():
    with pytest.raises(ValueError, match="no parameters"):
        select_parameters(nn.Identity(), "last")


def test_flatten_and_unflatten_are_inverse_in_parameter_order():
    model = mlp()
    selection = select_parameters(model, "all")
    named = dict(model.named_parameters())
    flat = selection.flatten([named[n] for n in selection.names])
    expected = torch.cat([model[0].weight.reshape(-1), model[0].bias, model[2].weight.reshape(-1),
                          model[2].bias])
    assert torch.equal(flat, expected)
    pieces = selection.unflatten(torch.stack([flat, 2 * flat]))
    for name in selection.names:
        assert pieces[name].shape == (2, *named[name].shape)
        assert torch.equal(pieces[name][1], 2 * named[name])
