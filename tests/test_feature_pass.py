"""The closed-form head's inference copy (fastinfluence.feature_pass) against the model itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.feature_pass import head_feature_pass
from fastinfluence.functional import FunctionalModel
from fastinfluence.models.cnn import PaperCNN
from fastinfluence.models.rescnn import ResCNN1d
from fastinfluence.params import select_parameters


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics and affine parameters far from the
    identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator))
                module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.3)
                module.weight.copy_(torch.randn(shape, generator=generator))
                module.bias.copy_(torch.randn(shape, generator=generator))
    return model.eval()


def functional(model: nn.Module, example: torch.Tensor) -> FunctionalModel:
    return FunctionalModel(model, select_parameters(model, "last", example), None,
                           torch.device("cpu"))


def module_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow twin: the model's own forward pass, the head's input taken by a hook."""
    captured = []
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    hook = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    with torch.no_grad():
        output = model(x)
    hook.remove()
    return captured[0], output


@pytest.mark.parametrize("make, shape, folded", [
    (lambda: PaperCNN(32), (6, 1, 32, 32), "5 Conv-BatchNorm pairs"),
    # input, 4 × 2 blocks, 2 shortcuts
    (lambda: ResCNN1d(width=2, blocks=4), (6, 1, 64), "11 Conv-BatchNorm pairs"),
    # the registry's fold: BatchNorm1d into a Linear too (not into the one of 3-d input,
    # whose BatchNorm normalises positions, not the Linear's outputs: its channels differ)
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(12, 6),
                           nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
     (6, 3, 5), "1 Linear-BatchNorm pair"),
])
def test_folded_copy_equals_the_model_in_float64(make, shape, folded):
    torch.manual_seed(0)
    model = randomised(make()).double()
    x = torch.randn(shape, dtype=torch.float64)
    feature_pass = head_feature_pass(functional(model, x[:2]))
    features, output = feature_pass(x)
    expected_features, expected_output = module_features(model, x)
    assert feature_pass.description == f"fx copy: {folded} folded"
    torch.testing.assert_close(features, expected_features, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-12)


def test_float32_cpu_conv2d_runs_channels_last_and_matches():
    torch.manual_seed(1)
    model = randomised(PaperCNN(32))
    x = torch.randn(5, 1, 32, 32)
    feature_pass = head_feature_pass(functional(model, x[:2]))
    features, output = feature_pass(x)
    expected_features, expected_output = module_features(model, x)
    assert feature_pass.description == "fx copy: 5 Conv-BatchNorm pairs folded, channels-last"
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output, expected_output, rtol=1e-4, atol=1e-5)


def test_training_mode_batchnorm_is_not_folded():
    model = randomised(PaperCNN(32)).double().train()
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    expected = module_features(copy.deepcopy(model), x)  # batch statistics, not running ones
    feature_pass = head_feature_pass(functional(model, x[:2]))
    assert feature_pass.description.startswith("module: nothing to fold")
    torch.testing.assert_close(feature_pass(x), expected)


def test_the_copy_uses_the_snapshot_not_later_weights():
    model = randomised(PaperCNN(32)).double()
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    fmodel = functional(model, x[:2])
    expected = module_features(model, x)
    feature_pass = head_feature_pass(fmodel)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    torch.testing.assert_close(feature_pass(x), expected, rtol=1e-12, atol=1e-12)


class Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        if h.sum() > 0:
            h = -h
        return self.head(h.flatten(1))


OFFSET = [0.0]


class ReadsAGlobal(nn.Module):
    """Traces, but bakes a Python number in: the copy goes stale when the number changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).flatten(1) + OFFSET[0])


def test_a_model_that_does_not_trace_runs_as_it_is():
    model = randomised(Branching()).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    feature_pass = head_feature_pass(functional(model, x[:2]))
    assert feature_pass.description.startswith("module: torch.fx could not trace the model")
    torch.testing.assert_close(feature_pass(x), module_features(model, x))


def test_a_copy_that_differs_from_the_model_is_dropped_on_the_first_batch():
    model = randomised(ReadsAGlobal()).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    feature_pass = head_feature_pass(functional(model, x[:2]))
    assert feature_pass.description.startswith("fx copy")
    OFFSET[0] = 1.0
    try:
        got = feature_pass(x)
        expected = module_features(model, x)
    finally:
        OFFSET[0] = 0.0
    assert feature_pass.description.startswith("module: the fx copy's features differ")
    torch.testing.assert_close(got, expected)


def test_influence_reports_the_feature_pass_and_scores_as_the_oracle():
    torch.manual_seed(2)
    model = randomised(PaperCNN(32)).double()
    train = (torch.randn(12, 1, 32, 32, dtype=torch.float64), torch.randint(0, 3, (12,)))
    val = (torch.randn(3, 1, 32, 32, dtype=torch.float64), torch.randint(0, 3, (3,)))
    damping = 0.01
    influence = fi.Influence(model, train, val, params="last", damping=damping)
    assert influence.report.feature_pass == "fx copy: 5 Conv-BatchNorm pairs folded"
    # the oracle differentiates the model itself, BatchNorm unfolded
    head_params = list([m for m in model.modules() if isinstance(m, nn.Linear)][-1].parameters())
    expected = reference.influence_scores(model, head_params, train, val, damping)
    torch.testing.assert_close(influence.scores(train), expected, rtol=1e-10, atol=1e-12)
    network = fi.Influence(model, train, val, params="all")
    assert network.report.feature_pass is None
