"""Patient-level splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfluence.datasets import split_by_patient


def random_cohort(seed=0, n_patients=80):
    rng = np.random.default_rng(seed)
    patient_class = rng.integers(0, 3, n_patients)
    counts = rng.integers(1, 20, n_patients)
    ids = np.repeat([f"p{k}" for k in range(n_patients)], counts)
    labels = np.repeat(patient_class, counts)
    order = rng.permutation(len(ids))  # slices of a patient need not be contiguous
    return ids[order], labels[order]


@pytest.mark.parametrize("seed", range(3))
def test_no_patient_in_two_splits(seed):
    ids, labels = random_cohort(seed)
    split = split_by_patient(ids, labels, seed=seed)
    parts = [set(ids[split.train]), set(ids[split.val]), set(ids[split.test])]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    everything = np.concatenate([split.train, split.val, split.test])
    assert np.array_equal(np.sort(everything), np.arange(len(ids)))


def test_generated_data_split_by_patient(small_brain):
    split = split_by_patient(small_brain.patient_ids, small_brain.labels)
    train = set(small_brain.patient_ids[split.train])
    assert not train & set(small_brain.patient_ids[split.test])
    assert not train & set(small_brain.patient_ids[split.val])
    assert len(small_brain.subset(split.train)) == len(split.train)


def test_fractions_and_class_balance():
    ids, labels = random_cohort(1, n_patients=200)
    split = split_by_patient(ids, torch.from_numpy(labels), seed=0)
    patients = [len(set(ids[part])) for part in (split.train, split.val, split.test)]
    assert patients[0] / 200 == pytest.approx(0.75, abs=0.02)
    assert patients[1] / 200 == pytest.approx(0.05, abs=0.02)
    assert patients[2] / 200 == pytest.approx(0.20, abs=0.02)
    for part in (split.train, split.val, split.test):
        assert set(labels[part]) == {0, 1, 2}


def test_each_split_gets_a_patient_of_each_class_when_possible():
    ids = np.array(["a", "b", "c", "d", "e", "f"])
    labels = np.array([0, 0, 0, 1, 1, 1])
    split = split_by_patient(ids, labels)
    for part in (split.train, split.val, split.test):
        assert set(labels[part]) == {0, 1}


def test_seeded():
    ids, labels = random_cohort(2)
    a, b = split_by_patient(ids, labels, seed=4), split_by_patient(ids, labels, seed=4)
    c = split_by_patient(ids, labels, seed=5)
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((["a", "b"], [0]), {}, "equal length"),
        (([], []), {}, "empty"),
        ((["a"], [0]), {"fractions": (0.5, 0.5, 0.5)}, "fractions"),
        ((["a"], [0]), {"fractions": (1.2, -0.2, 0.0)}, "fractions"),
    ],
)
def test_bad_input(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        split_by_patient(*args, **kwargs)
