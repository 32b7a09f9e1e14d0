"""Config defaults (the paper's values, docs/design.md §5) and ValueErrors for bad settings."""

from __future__ import annotations

import pytest

from fastinfluence.robust import ATConfig, ISPConfig, ISRConfig, TrainConfig


def test_paper_defaults():
    isr, isp, at = ISRConfig(), ISPConfig(), ATConfig()
    for config in (isr, isp, at):
        assert (config.epochs, config.lr, config.batch_size, config.flip) == (40, 0.01, 32, True)
    assert (isr.pretrain_epochs, isr.max_weight, isr.emphasis) == (10, 2.0, "helpful")
    assert (isp.pretrain_epochs, isp.ratio, isp.gamma, isp.selection) == (10, 0.1, 0.01, "helpful")
    assert (at.epsilon, at.alpha) == (0.1, 0.03)


@pytest.mark.parametrize(("config_type", "field", "value"), [
    (TrainConfig, "epochs", 0),
    (TrainConfig, "epochs", 2.5),
    (TrainConfig, "lr", 0.0),
    (TrainConfig, "lr", float("nan")),
    (TrainConfig, "batch_size", 0),
    (TrainConfig, "seed", -1),
    (TrainConfig, "eval_batch_size", 0),
    (TrainConfig, "flip", 1),
    (TrainConfig, "recalibrate_bn", "yes"),
    (TrainConfig, "checkpoint", 3),
    (TrainConfig, "device", "gpu0"),
    (TrainConfig, "optimizer", "rmsprop"),
    (TrainConfig, "weight_decay", -1e-4),
    (TrainConfig, "momentum", 1.0),
    (ATConfig, "epsilon", -0.1),
    (ATConfig, "alpha", 0),
    (ISRConfig, "pretrain_epochs", -1),
    (ISRConfig, "pretrain_epochs", 40),
    (ISRConfig, "damping", -1.0),
    (ISRConfig, "solver", "newton"),
    (ISRConfig, "max_weight", 0.5),
    (ISRConfig, "emphasis", "neutral"),
    (ISPConfig, "ratio", 0.0),
    (ISPConfig, "ratio", 1.5),
    (ISPConfig, "gamma", 0.0),
    (ISPConfig, "selection", "random"),
    (ISPConfig, "clip", (1.0, 0.0)),
])
def test_bad_values_raise(config_type, field, value):
    with pytest.raises(ValueError, match=field):
        config_type(**{field: value})


def test_pretrain_must_leave_epochs():
    ISRConfig(epochs=2, pretrain_epochs=1)
    ISRConfig(epochs=2, pretrain_epochs=0)
    with pytest.raises(ValueError, match="pretrain_epochs must be < epochs"):
        ISPConfig(epochs=2, pretrain_epochs=2)


def test_momentum_only_with_sgd():
    TrainConfig(optimizer="sgd", momentum=0.9)
    with pytest.raises(ValueError, match="momentum is an SGD setting"):
        TrainConfig(momentum=0.9)
