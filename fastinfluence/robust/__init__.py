"""Robust training for noisy images (the ISR/ISP paper, docs/design.md §5).

>>> from fastinfluence.robust import ISPTrainer, ISPConfig
>>> result = ISPTrainer(model, ISPConfig(lr=1e-3)).fit(train, val, test)
>>> result.final_test_accuracy, result.test_accuracy_at_best_val

Every trainer shares one loop (:class:`Trainer`: Adam, random horizontal flips, per-epoch
validation and test accuracy, optional checkpoint, tqdm bar) and overrides its hooks.
"""

from fastinfluence.robust.config import ATConfig, ISPConfig, ISRConfig, TrainConfig
from fastinfluence.robust.loop import EpochRecord, Trainer, TrainResult
from fastinfluence.robust.methods import (
    ATTrainer,
    ISPTrainer,
    ISRTrainer,
    NaiveTrainer,
    fgsm_uniform,
    influence_weights,
    select_influential,
)
from fastinfluence.robust.n2v import N2VConfig, N2VTrainer, blind_spot_mask

__all__ = [
    "ATConfig",
    "ATTrainer",
    "EpochRecord",
    "ISPConfig",
    "ISPTrainer",
    "ISRConfig",
    "ISRTrainer",
    "N2VConfig",
    "N2VTrainer",
    "NaiveTrainer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "blind_spot_mask",
    "fgsm_uniform",
    "influence_weights",
    "select_influential",
]
