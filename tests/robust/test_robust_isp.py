"""ISP: exactly ⌈r·n⌉ samples perturbed, the right ones, by −γ·I_pert, kept in [0, 1]."""

from __future__ import annotations

import copy

import pytest
import torch

from fastinfluence import reference
from fastinfluence.robust import ISPConfig, ISPTrainer, select_influential
from fastinfluence.robust.methods import num_selected


@pytest.mark.parametrize(("ratio", "n", "expected"), [
    # 0.07 × 100, 0.14 × 50 and 0.28 × 25 are 7.000000000000001 in binary floating point.
    (0.1, 30, 3), (0.1, 31, 4), (0.07, 100, 7), (0.14, 50, 7), (0.28, 25, 7), (1.0, 5, 5),
    (0.01, 5, 1),
])
def test_ceil_of_ratio_times_n(ratio, n, expected):
    assert num_selected(ratio, n) == expected


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


class _Snapshotting(ISPTrainer):
    """Copies the model when it computes influence."""

    def apply(self, influence):
        self.snapshot = copy.deepcopy(self.model)
        super().apply(influence)


@pytest.mark.parametrize(("selection", "ratio", "gamma", "k"), [
    ("helpful", 0.1, 0.01, 2), ("harmful", 0.3, 0.01, 5), ("helpful", 0.3, 1e4, 5),
])  # k = ⌈r·16⌉: ⌈1.6⌉ = 2, ⌈4.8⌉ = 5
def test_perturbs_the_selected_samples_by_textbook_influence(
        model, splits, head_influence, selection, ratio, gamma, k):
    config = ISPConfig(epochs=2, pretrain_epochs=1, lr=1e-3, batch_size=8, ratio=ratio,
                       gamma=gamma, selection=selection)
    trainer = _Snapshotting(model, config)
    train, val, _ = splits
    x, y = train
    original = x.clone()
    result = trainer.fit(*splits)
    assert len(result.history) == 2
    assert torch.equal(x, original)  # the caller's tensor is not modified in place

    textbook = head_influence(trainer.snapshot, train, val, config.damping)
    ranked = torch.argsort(textbook.scores, descending=selection == "harmful")
    # The k-th and (k+1)-th scores lie far apart next to float32's error: the oracle is sharp.
    ordered = textbook.scores[ranked]
    assert (ordered[k - 1] - ordered[k]).abs() > 1e-3 * textbook.scores.abs().max()
    expected = sorted(ranked[:k].tolist())
    selected = result.extras["selected"]
    assert sorted(selected.tolist()) == expected

    perturbed = trainer.train_data[0]
    assert perturbed.dtype == torch.float32
    changed = (perturbed != x).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == expected
    # Eq. 8's step x − γ·I_pert, then clipped to [0, 1] (I_pert by the textbook loop).
    maps = reference.perturbation_influence(textbook.model, textbook.head,
                                            x[selected].double(), y[selected], textbook.s)
    stepped = x[selected].double() - gamma * maps
    clipped = stepped.clamp(0, 1)
    # float32 images in [0, 1] round by up to 6e-8; float32 maps carry ~1e-5 relative error.
    tolerance = 1e-7 + 1e-4 * gamma * float(maps.abs().max())
    torch.testing.assert_close(perturbed[selected].double(), clipped, rtol=0, atol=tolerance)
    torch.testing.assert_close(result.extras["delta"].double(), clipped - x[selected].double(),
                               rtol=0, atol=tolerance)
    if gamma > 1:  # large steps are clipped at both bounds
        assert (stepped < 0).any() and (stepped > 1).any()
        assert (perturbed[selected] == 0).any() and (perturbed[selected] == 1).any()
    else:  # small steps survive as float (no 8-bit rounding)
        assert 0 < result.extras["delta"].abs().max() < 1 / 255
