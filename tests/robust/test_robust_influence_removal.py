"""Influence-based removal: the ⌈r·n⌉ most harmful samples leave after the warm-up."""

from __future__ import annotations

import copy

import pytest
import torch

from fastinfluence.robust import InfluenceRemovalConfig, InfluenceRemovalTrainer


class _Recording(InfluenceRemovalTrainer):
    """Copies the model when it computes influence and records each batch's indices."""

    def apply(self, influence):
        self.snapshot = copy.deepcopy(self.model)
        super().apply(influence)

    def batch_loss(self, x, y, index):
        self.batches = getattr(self, "batches", [])
        self.batches.append((len(self.train_data[1]), index.clone()))
        return super().batch_loss(x, y, index)


def test_removes_the_most_harmful_after_pretraining(model, splits, head_influence):
    config = InfluenceRemovalConfig(epochs=2, pretrain_epochs=1, lr=1e-3, batch_size=8,
                                    ratio=0.2)
    trainer = _Recording(model, config)
    result = trainer.fit(*splits)
    assert len(result.history) == 2
    train, val, _ = splits
    textbook = head_influence(trainer.snapshot, train, val, config.damping).scores
    torch.testing.assert_close(result.extras["scores"].double(), textbook, rtol=1e-4,
                               atol=1e-6)
    # ⌈0.2 · 16⌉ = 4 removed: the four largest I (harmful), the rest trains on
    removed = result.extras["removed"]
    assert sorted(removed.tolist()) == sorted(torch.topk(textbook, 4).indices.tolist())
    assert result.extras["scoring"] == "head-closed-form"
    sizes = [size for size, _ in trainer.batches]
    assert sizes == [16, 16, 12, 12]  # epoch 1: all 16 in 2 batches; epoch 2: 12
    kept = torch.ones(16, dtype=torch.bool)
    kept[removed] = False
    torch.testing.assert_close(trainer.train_data[0], train[0][kept])
    torch.testing.assert_close(trainer.train_data[1], train[1][kept])


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
def test_config_refuses_ratios_outside_0_1(ratio):
    with pytest.raises(ValueError, match="ratio"):
        InfluenceRemovalConfig(epochs=2, pretrain_epochs=1, ratio=ratio)
