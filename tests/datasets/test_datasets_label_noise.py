"""Label noise: symmetric flips and the skin paper's loss-ranked flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfluence.datasets import flip_labels_by_loss, flip_labels_symmetric


def labels_3(n_per_class=(50, 30, 20)):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.2, 0.4])
def test_symmetric_flips_rate_of_each_class(rate):
    labels = labels_3()
    noisy, flipped = flip_labels_symmetric(labels, rate, seed=0)
    assert noisy.dtype == torch.int64 and flipped.dtype == torch.bool
    for c, n in enumerate((50, 30, 20)):
        assert int(flipped[labels == c].sum()) == int(np.floor(rate * n + 0.5))
    assert torch.equal(noisy != labels, flipped)
    assert noisy.min() >= 0 and noisy.max() <= 2


def test_symmetric_targets_cover_the_other_classes_and_are_seeded():
    labels = torch.zeros(2000, dtype=torch.int64)
    labels[1000:] = 1
    labels[1500:] = 2
    noisy, flipped = flip_labels_symmetric(labels, 0.4, seed=1)
    targets = noisy[flipped & (labels == 0)]
    share = (targets == 1).float().mean().item()
    assert 0.4 < share < 0.6  # uniform over the two other classes
    again, _ = flip_labels_symmetric(labels, 0.4, seed=1)
    other, _ = flip_labels_symmetric(labels, 0.4, seed=2)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_loss_ranked_flips_take_the_highest_losses_per_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], [40, 20])
    losses = rng.random(60)
    noisy, flipped = flip_labels_by_loss(labels, losses, 0.2)
    for c, n in ((0, 40), (1, 20)):
        members = np.nonzero(labels == c)[0]
        top = members[np.argsort(losses[members])[::-1][: int(0.2 * n)]]
        assert set(np.nonzero(flipped.numpy())[0]) & set(members) == set(top)
    assert torch.equal(noisy[flipped], torch.from_numpy(1 - labels)[flipped])  # binary: swap


def test_loss_ranked_flips_only_candidates():
    labels = np.repeat([0, 1], [10, 10])
    losses = np.arange(20, dtype=float)
    candidates = np.zeros(20, dtype=bool)
    candidates[::2] = True  # the reference model scored only the even samples
    _, flipped = flip_labels_by_loss(labels, losses, 0.4, candidates=candidates)
    assert not flipped[~torch.from_numpy(candidates)].any()
    assert np.nonzero(flipped.numpy())[0].tolist() == [6, 8, 16, 18]


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: flip_labels_symmetric([0, 1, 1], 1.5), "rate"),
        (lambda: flip_labels_symmetric([0.0, 1.0], 0.1), "integers"),
        (lambda: flip_labels_symmetric([0, 3], 0.1, num_classes=3), "num_classes"),
        (lambda: flip_labels_symmetric([], 0.1), "non-empty"),
        (lambda: flip_labels_by_loss([0, 1], [0.1], 0.1), "losses"),
        (lambda: flip_labels_by_loss([0, 1], [0.1, np.nan], 0.1), "NaN"),
        (lambda: flip_labels_by_loss([0, 1], [0.1, 0.2], 0.1, candidates=[1, 0]), "candidates"),
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()
