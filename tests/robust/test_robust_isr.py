"""ISR: weights in [1, m] with the documented orientation, and the weighted loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastinfluence.robust import ISRConfig, ISRTrainer, influence_weights


def test_weights_min_max_scaled_helpful_gets_m():
    scores = torch.tensor([0.3, -2.0, 1.0, 0.0, -0.5])
    weights = influence_weights(scores, 3.0)
    assert weights.min() == 1 and weights.max() == 3
    assert int(weights.argmax()) == 1 and int(weights.argmin()) == 2  # most helpful → m
    # linear in −I: w = 1 + (m − 1)(−I − min)/(max − min)
    torch.testing.assert_close(weights, 1 + 2 * (-scores + 1.0) / 3.0)


def test_harmful_emphasis_reverses_orientation():
    scores = torch.tensor([0.3, -2.0, 1.0, 0.0, -0.5])
    weights = influence_weights(scores, 2.0, "harmful")
    assert int(weights.argmax()) == 2 and int(weights.argmin()) == 1
    torch.testing.assert_close(weights, 1 + (scores + 2.0) / 3.0)


def test_equal_scores_give_unit_weights():
    assert torch.equal(influence_weights(torch.full((4,), 0.7), 2.0), torch.ones(4))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_weight": 0.5}, "max_weight"), ({"emphasis": "both"}, "emphasis"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        influence_weights(torch.zeros(3), **kwargs)


class _Snapshotting(ISRTrainer):
    """Copies the model when it computes influence, and records which batches were weighted."""

    unweighted_batches: list[bool]

    def apply(self, influence):
        self.snapshot = copy.deepcopy(self.model)
        super().apply(influence)

    def batch_loss(self, x, y, index):
        self.unweighted_batches = getattr(self, "unweighted_batches", [])
        self.unweighted_batches.append(self.weights is None)
        return super().batch_loss(x, y, index)


@pytest.mark.parametrize("emphasis", ["helpful", "harmful"])
def test_trainer_weights_from_textbook_influence_after_pretraining(
        model, splits, head_influence, emphasis):
    config = ISRConfig(epochs=2, pretrain_epochs=1, lr=1e-3, batch_size=8, max_weight=2.0,
                       emphasis=emphasis)
    trainer = _Snapshotting(model, config)
    result = trainer.fit(*splits)
    assert len(result.history) == 2
    # Influence is computed after the T_pre = 1 warm-up epoch (2 batches) and used after it.
    assert trainer.unweighted_batches == [True, True, False, False]
    train, val, _ = splits
    textbook = head_influence(trainer.snapshot, train, val, config.damping).scores
    torch.testing.assert_close(result.extras["scores"].double(), textbook, rtol=1e-4, atol=1e-6)
    # Algorithm 1's min-max scaling to [1, m] of v = −I (helpful) or v = I (harmful).
    v = -textbook if emphasis == "helpful" else textbook
    expected = 1 + (config.max_weight - 1) * (v - v.min()) / (v.max() - v.min())
    torch.testing.assert_close(result.extras["weights"].double(), expected, rtol=0, atol=1e-4)


def test_weighted_loss_is_equation_9(model, splits):
    trainer = ISRTrainer(model, ISRConfig(epochs=2, pretrain_epochs=1))
    x, y = splits[0]
    index = torch.tensor([3, 0, 7])
    model.eval()
    plain = trainer.batch_loss(x[index], y[index], index)
    torch.testing.assert_close(plain, F.cross_entropy(model(x[index]), y[index]))
    trainer.weights = torch.linspace(1, 2, 16)
    weighted = trainer.batch_loss(x[index], y[index], index)
    losses = F.cross_entropy(model(x[index]), y[index], reduction="none")
    torch.testing.assert_close(weighted, (trainer.weights[index] * losses).sum() / 3)
