"""Patient-level train/validation/test splits (no patient in two splits)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAPER_FRACTIONS: tuple[float, float, float] = (0.75, 0.05, 0.20)


@dataclass(frozen=True)
class PatientSplit:
    """Sorted slice indices (int64 arrays) of each split; index tensors or arrays with them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_by_patient(
    patient_ids: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    fractions: Sequence[float] = PAPER_FRACTIONS,
    *,
    seed: int = 0,
) -> PatientSplit:
    """Split slices by patient into train/val/test, keeping the class balance.

    Patients are grouped by their class (the most frequent label of their slices) and each
    class's patients are shared out in ``fractions`` (largest remainder on patient counts),
    so every class is spread over the splits as evenly as whole patients allow. When a class
    has at least as many patients as there are non-zero fractions, each such split gets at
    least one of its patients.

    Args:
        patient_ids: one id per slice.
        labels: one class label per slice.
        fractions: train, val and test fractions of the patients (paper: 75/5/20); they must
            be non-negative and sum to 1.
        seed: seeds the shuffling of patients.
    """
    ids = np.asarray(patient_ids).astype(str)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if ids.ndim != 1 or labels.ndim != 1 or len(ids) != len(labels):
        raise ValueError(
            f"patient_ids and labels must be 1-D of equal length, got {ids.shape} and "
            f"{labels.shape}"
        )
    if len(ids) == 0:
        raise ValueError("patient_ids is empty")
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions.tolist()}"
        )
    rng = np.random.default_rng(seed)
    patients = np.unique(ids)
    patient_class = np.array(
        [Counter(labels[ids == p].tolist()).most_common(1)[0][0] for p in patients]
    )
    assignment: dict[str, int] = {}
    for cls in np.unique(patient_class):
        members = rng.permutation(patients[patient_class == cls])
        counts = _share(len(members), fractions)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for part in range(3):
            for patient in members[bounds[part] : bounds[part + 1]]:
                assignment[patient] = part
    part_of = np.array([assignment[p] for p in ids])
    return PatientSplit(*(np.nonzero(part_of == k)[0].astype(np.int64) for k in range(3)))


def _share(n: int, fractions: np.ndarray) -> np.ndarray:
    """Whole counts summing to ``n`` close to ``n * fractions`` (largest remainder), with at
    least one in every non-zero part when ``n`` allows."""
    ideal = n * fractions
    counts = np.floor(ideal).astype(np.int64)
    for k in np.argsort(-(ideal - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    wanted = fractions > 0
    if n >= wanted.sum():
        for k in np.nonzero(wanted & (counts == 0))[0]:
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[k] += 1
    return counts


def patient_folds(
    patient_ids: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n_folds: int = 10,
    *,
    seed: int = 0,
) -> list[np.ndarray]:
    """Leave-subjects-out cross-validation folds: ``n_folds`` sorted index arrays, each the
    samples of about ``1/n_folds`` of the patients; no patient is in two folds.

    Patients are grouped by their class (the most frequent label of their samples), shuffled
    with ``seed`` and dealt to the folds in turn, class after class, so every fold gets about
    the same number of patients of each class (the MRS paper's "10 sub-lists each with
    around 40 patients"). Fold sizes in samples follow the patients' sample counts.
    """
    ids = np.asarray(patient_ids).astype(str)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if ids.ndim != 1 or labels.ndim != 1 or len(ids) != len(labels):
        raise ValueError(
            f"patient_ids and labels must be 1-D of equal length, got {ids.shape} and "
            f"{labels.shape}"
        )
    patients = np.unique(ids)
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or not 2 <= n_folds <= len(
        patients
    ):
        raise ValueError(f"n_folds must be an integer in [2, {len(patients)}] (the number of "
                         f"patients), got {n_folds!r}")
    rng = np.random.default_rng(seed)
    patient_class = np.array(
        [Counter(labels[ids == p].tolist()).most_common(1)[0][0] for p in patients]
    )
    fold_of: dict[str, int] = {}
    turn = 0
    for cls in np.unique(patient_class):
        for patient in rng.permutation(patients[patient_class == cls]):
            fold_of[patient] = turn % n_folds
            turn += 1
    assignment = np.array([fold_of[p] for p in ids])
    return [np.nonzero(assignment == k)[0].astype(np.int64) for k in range(n_folds)]
