"""Robust training for noisy images (the ISR/ISP paper) and noisy labels (the skin paper:
OUSM, OUSM + LoOP re-weighting, forward correction), docs/design.md §5.

>>> from fastinfluence.robust import ISPTrainer, ISPConfig
>>> result = ISPTrainer(model, ISPConfig(lr=1e-3)).fit(train, val, test)
>>> result.final_test_accuracy, result.test_accuracy_at_best_val

Every trainer shares one loop (:class:`Trainer`: Adam or SGD, random horizontal flips, per-epoch
validation and test accuracy, optional checkpoint, tqdm bar) and overrides its hooks.
"""

from fastinfluence.robust.config import (
    ATConfig,
    ForwardConfig,
    InfluenceRemovalConfig,
    ISPConfig,
    ISRConfig,
    OUSMConfig,
    OUSMLoOPConfig,
    TrainConfig,
)
from fastinfluence.robust.loop import EpochRecord, Trainer, TrainResult
from fastinfluence.robust.methods import (
    ATTrainer,
    InfluenceRemovalTrainer,
    ISPTrainer,
    ISRTrainer,
    NaiveTrainer,
    fgsm_uniform,
    influence_weights,
    select_influential,
)
from fastinfluence.robust.n2v import N2VConfig, N2VTrainer, blind_spot_mask
from fastinfluence.robust.noisy_labels import (
    DETECTORS,
    ForwardTrainer,
    MislabelScores,
    OUSMLoOPTrainer,
    OUSMTrainer,
    ReferenceScores,
    detection_metrics,
    estimate_transition,
    forward_corrected_loss,
    local_outlier_probability,
    loop_weights,
    mislabel_scores,
    ousm_keep,
    ousm_loss,
    penultimate_features,
    precision_at_noise_count,
    reference_losses,
    roc_auc,
)

__all__ = [
    "DETECTORS",
    "ATConfig",
    "ATTrainer",
    "EpochRecord",
    "ForwardConfig",
    "ForwardTrainer",
    "ISPConfig",
    "InfluenceRemovalConfig",
    "InfluenceRemovalTrainer",
    "MislabelScores",
    "ISPTrainer",
    "ISRConfig",
    "ISRTrainer",
    "N2VConfig",
    "N2VTrainer",
    "NaiveTrainer",
    "OUSMConfig",
    "OUSMLoOPConfig",
    "OUSMLoOPTrainer",
    "OUSMTrainer",
    "ReferenceScores",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "blind_spot_mask",
    "estimate_transition",
    "fgsm_uniform",
    "detection_metrics",
    "forward_corrected_loss",
    "influence_weights",
    "local_outlier_probability",
    "loop_weights",
    "mislabel_scores",
    "ousm_keep",
    "ousm_loss",
    "penultimate_features",
    "precision_at_noise_count",
    "reference_losses",
    "roc_auc",
    "select_influential",
]
