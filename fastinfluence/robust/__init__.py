"""Robust training for noisy images (the ISR/ISP paper), noisy labels (the skin paper:
OUSM, OUSM + LoOP re-weighting, forward correction), docs/design.md §5, and adversarial
noise (the denoising paper: neighbour loss and embedded auto-encoder, Reformer and HGD, and
the FGSM / I-FGSM / Carlini-Wagner attacks).

>>> from fastinfluence.robust import ISPTrainer, ISPConfig
>>> result = ISPTrainer(model, ISPConfig(lr=1e-3)).fit(train, val, test)
>>> result.final_test_accuracy, result.test_accuracy_at_best_val

Every trainer shares one loop (:class:`Trainer`: Adam or SGD, random horizontal flips, per-epoch
validation and test accuracy, optional checkpoint, tqdm bar) and overrides its hooks.
"""

from fastinfluence.robust.attacks import carlini_wagner_l2, fgsm, ifgsm
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
from fastinfluence.robust.denoising import (
    DenoisingConfig,
    DenoisingNet,
    DenoisingTrainer,
    ImageDecoder,
    neighbour_loss,
    noisy_copies,
    reconstruction_loss,
)
from fastinfluence.robust.input_denoisers import (
    ConvDenoiser,
    DenoisedClassifier,
    train_guided_denoiser,
    train_reformer,
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
    "ConvDenoiser",
    "DenoisedClassifier",
    "DenoisingConfig",
    "DenoisingNet",
    "DenoisingTrainer",
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
    "ImageDecoder",
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
    "carlini_wagner_l2",
    "estimate_transition",
    "fgsm",
    "fgsm_uniform",
    "detection_metrics",
    "forward_corrected_loss",
    "ifgsm",
    "influence_weights",
    "local_outlier_probability",
    "loop_weights",
    "mislabel_scores",
    "neighbour_loss",
    "noisy_copies",
    "ousm_keep",
    "ousm_loss",
    "penultimate_features",
    "precision_at_noise_count",
    "reconstruction_loss",
    "reference_losses",
    "roc_auc",
    "select_influential",
    "train_guided_denoiser",
    "train_reformer",
]
