"""The embedded brain-tumour generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfluence.datasets import BrainTumourData, make_brain_tumour
from fastinfluence.datasets.brain_tumour import (
    CLASS_NAMES,
    PAPER_PATIENTS_PER_CLASS,
    PAPER_SLICES_PER_CLASS,
)


def test_types_shapes_and_ranges(small_brain):
    data = small_brain
    assert isinstance(data, BrainTumourData)
    assert data.images.dtype == torch.float32 and data.images.shape == (36, 1, 32, 32)
    assert data.masks.dtype == torch.bool and data.masks.shape == data.images.shape
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == {0, 1, 2}
    assert data.images.min() >= 0 and data.images.max() <= 1
    # every image is scaled by its own maximum
    torch.testing.assert_close(data.images.amax(dim=(1, 2, 3)), torch.ones(36))
    assert data.class_names == CLASS_NAMES == ("meningioma", "glioma", "pituitary")
    assert len(data.patient_ids) == 36 and len(set(data.patient_ids)) == 9
    assert data.folds is None


def test_every_slice_has_a_tumour_and_every_patient_one_class(small_brain):
    assert small_brain.masks.flatten(1).any(dim=1).all()
    for patient in set(small_brain.patient_ids):
        labels = small_brain.labels[torch.from_numpy(small_brain.patient_ids == patient)]
        assert labels.unique().numel() == 1


def test_class_balance_follows_the_paper():
    data = make_brain_tumour(n_slices=60, n_patients=20, image_size=16, seed=3)
    slices = torch.bincount(data.labels, minlength=3).numpy()
    expected = 60 * np.array(PAPER_SLICES_PER_CLASS) / sum(PAPER_SLICES_PER_CLASS)
    assert np.abs(slices - expected).max() < 1
    patient_class = {p: int(c) for p, c in zip(data.patient_ids, data.labels, strict=True)}
    patients = np.bincount(list(patient_class.values()), minlength=3)
    expected = 20 * np.array(PAPER_PATIENTS_PER_CLASS) / sum(PAPER_PATIENTS_PER_CLASS)
    assert np.abs(patients - expected).max() < 1


@pytest.mark.parametrize(("n_slices", "n_patients"), [(10, 2), (5, 1), (7, 2)])
def test_fewer_patients_than_classes_still_gives_every_slice(n_slices, n_patients):
    data = make_brain_tumour(n_slices=n_slices, n_patients=n_patients, image_size=16, seed=0)
    assert data.images.shape[0] == len(data.labels) == len(data.patient_ids) == n_slices
    assert len(set(data.patient_ids)) == n_patients


def test_seeded():
    a = make_brain_tumour(n_slices=6, n_patients=3, image_size=16, seed=1)
    b = make_brain_tumour(n_slices=6, n_patients=3, image_size=16, seed=1)
    c = make_brain_tumour(n_slices=6, n_patients=3, image_size=16, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_pituitary_tumours_sit_on_the_midline(small_brain):
    columns = torch.arange(32, dtype=torch.float32)
    pituitary = small_brain.masks[small_brain.labels == 2, 0].float()
    centroid = (pituitary.sum(1) * columns).sum(1) / pituitary.sum((1, 2))
    assert (centroid - 15.5).abs().max() < 4  # FOV 220 mm: 4 pixels ~ 27 mm
    others = small_brain.masks[small_brain.labels != 2, 0].float()
    spread = (others.sum(1) * columns).sum(1) / others.sum((1, 2))
    assert (spread - 15.5).abs().max() > 4  # lateral lesions exist among the rest


def test_lesion_contrast_changes_the_tumour_not_the_rest():
    faint = make_brain_tumour(n_slices=8, n_patients=3, image_size=32, seed=5, lesion_contrast=1e-3)
    strong = make_brain_tumour(n_slices=8, n_patients=3, image_size=32, seed=5)
    assert torch.equal(faint.masks, strong.masks)
    diff = (strong.images - faint.images).abs()
    near = torch.nn.functional.max_pool2d(strong.masks.float(), 5, 1, 2) > 0
    assert diff[strong.masks].mean() > 5 * diff[~near].mean()


def test_anatomy_varies_between_patients_unless_switched_off():
    def background_spread(variation):
        data = make_brain_tumour(
            n_slices=6, n_patients=6, image_size=32, seed=4, anatomy_variation=variation
        )
        head = (data.images > 0.02).float()  # head outline, independent of the lesion
        return head.std(dim=0).mean().item()

    assert background_spread(1.0) > background_spread(0.0)


def test_paper_size_flag_sets_the_defaults():
    data = make_brain_tumour(n_slices=3, n_patients=3, paper_size=True, seed=0)
    assert data.images.shape == (3, 1, 256, 256)


def test_subset_keeps_fields_aligned(small_brain):
    part = small_brain.subset(np.array([5, 0, 7]))
    assert torch.equal(part.images, small_brain.images[[5, 0, 7]])
    assert part.patient_ids.tolist() == small_brain.patient_ids[[5, 0, 7]].tolist()
    assert torch.equal(part.labels, small_brain.labels[[5, 0, 7]])
    assert len(part) == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_slices": 0}, "n_slices"),
        ({"n_slices": 4, "n_patients": 5}, "n_patients"),
        ({"n_patients": 2.5}, "n_patients"),
        ({"image_size": 8}, "image_size"),
        ({"lesion_contrast": 0.0}, "lesion_contrast"),
        ({"anatomy_variation": -1.0}, "anatomy_variation"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_brain_tumour(**kwargs)


def test_data_container_checks_lengths():
    with pytest.raises(ValueError, match="labels"):
        BrainTumourData(
            images=torch.zeros(2, 1, 4, 4),
            labels=torch.zeros(3, dtype=torch.int64),
            patient_ids=np.array(["a", "b"]),
            masks=torch.zeros(2, 1, 4, 4, dtype=torch.bool),
        )
