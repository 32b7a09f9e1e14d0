"""ISP: exactly ⌈r·n⌉ samples perturbed, the right ones, by −γ·I_pert, kept in [0, 1]."""

from __future__ import annotations

import math

import pytest
import torch

from fastinfluence.robust import ISPConfig, ISPTrainer, select_influential
from fastinfluence.robust.methods import num_selected


@pytest.mark.parametrize(("ratio", "n", "expected"), [
    (0.1, 30, 3), (0.1, 31, 4), (0.07, 100, 7), (0.14, 50, 7), (0.28, 25, 7), (1.0, 5, 5),
    (0.01, 5, 1),
])
def test_ceil_of_ratio_times_n(ratio, n, expected):
    assert num_selected(ratio, n) == expected


def test_ceil_does_not_overshoot_float_products():
    assert math.ceil(0.07 * 100) == 8  # 7.000000000000001 in binary floating point
    assert num_selected(0.07, 100) == 7


def test_selection_orders():
    scores = torch.tensor([0.5, -1.0, 2.0, -3.0, 0.0, 1.0, -0.2, 0.1, 3.0, -0.1])
    assert select_influential(scores, 0.3).tolist() == [3, 1, 6]  # most helpful first
    assert select_influential(scores, 0.3, "harmful").tolist() == [8, 2, 5]
    ties = torch.zeros(5)
    assert select_influential(ties, 0.4).tolist() == [0, 1]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.2}, "ratio"), ({"selection": "all"}, "selection"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_influential(torch.zeros(3), **kwargs)


class _Capturing(ISPTrainer):
    """Keeps the Influence object (a snapshot of the model at T_pre) and the images before."""

    def apply(self, influence):
        self.captured = influence
        self.original = self.train_data[0].clone()
        super().apply(influence)


@pytest.mark.parametrize(("selection", "ratio", "gamma"), [
    ("helpful", 0.1, 0.01), ("harmful", 0.3, 0.01), ("helpful", 0.3, 1e4),
])
def test_perturbs_exactly_the_selected_samples(model, splits, selection, ratio, gamma):
    config = ISPConfig(epochs=2, pretrain_epochs=1, lr=1e-3, batch_size=8, ratio=ratio,
                       gamma=gamma, selection=selection)
    trainer = _Capturing(model, config)
    x, y = splits[0]
    result = trainer.fit(*splits)
    assert len(result.history) == 2
    k = math.ceil(round(ratio * 16, 6))
    scores = trainer.captured.scores()
    expected = torch.argsort(scores, descending=selection == "harmful")[:k]
    assert sorted(result.extras["selected"].tolist()) == sorted(expected.tolist())

    perturbed = trainer.train_data[0]
    assert torch.equal(trainer.original, x)  # the caller's tensor is not modified in place
    changed = (perturbed != x).flatten(1).any(1)
    assert sorted(changed.nonzero().flatten().tolist()) == sorted(expected.tolist())
    assert perturbed.dtype == torch.float32
    assert perturbed.min() >= 0 and perturbed.max() <= 1

    selected = result.extras["selected"]
    maps = trainer.captured.perturbation(x[selected], y[selected])
    torch.testing.assert_close(perturbed[selected], (x[selected] - gamma * maps).clamp(0, 1))
    torch.testing.assert_close(result.extras["delta"], perturbed[selected] - x[selected])
    if gamma > 1:  # large steps must be clipped, and both bounds reached
        assert (perturbed[selected] == 0).any() and (perturbed[selected] == 1).any()
    else:  # small steps survive as float (no 8-bit rounding)
        delta = result.extras["delta"]
        assert 0 < delta.abs().max() < 1 / 255
