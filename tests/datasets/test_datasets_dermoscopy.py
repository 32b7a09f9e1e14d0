"""The embedded dermoscopy generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastinfluence.datasets import (
    DermoscopyData,
    SkinLesionData,
    make_dermoscopy,
    save_dermoscopy_grid,
    split_by_patient,
)
from fastinfluence.datasets.dermoscopy import DIAGNOSES, ISIC2017_MIX, SKIN4_MIX


@pytest.fixture(scope="module")
def skin():
    return make_dermoscopy(80, image_size=32, seed=0)


def test_types_shapes_ranges_and_isic2017_structure(skin):
    assert isinstance(skin, DermoscopyData) and isinstance(skin, SkinLesionData)
    assert skin.images.dtype == torch.float32 and skin.images.shape == (80, 3, 32, 32)
    assert skin.images.min() >= 0 and skin.images.max() <= 1
    assert skin.class_names == ("benign", "melanoma")
    assert skin.masks.dtype == torch.bool and skin.masks.shape == (80, 1, 32, 32)
    assert skin.masks.flatten(1).any(1).all()  # every image shows a lesion
    counts = {code: int((skin.diagnoses == code).sum()) for code in ISIC2017_MIX}
    expected = {c: 80 * w / sum(ISIC2017_MIX.values()) for c, w in ISIC2017_MIX.items()}
    assert all(abs(counts[c] - expected[c]) < 1 for c in counts)
    assert torch.equal(skin.labels, torch.from_numpy(skin.diagnoses == "MEL").long())
    patients = set(skin.patient_ids.tolist())
    assert 1 < len(patients) < 80 and len(set(skin.image_ids.tolist())) == 80


def test_seeded_and_sized():
    a = make_dermoscopy(6, image_size=16, seed=1)
    b = make_dermoscopy(6, image_size=16, seed=1)
    c = make_dermoscopy(6, image_size=16, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.diagnoses == b.diagnoses).all() and (a.patient_ids == b.patient_ids).all()
    assert not torch.equal(a.images, c.images)


def test_patient_shares_skin_tone():
    data = make_dermoscopy(120, n_patients=20, image_size=32, seed=3, artefacts=0.0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[4:-4, 4:-4] = False
    skin = torch.stack([data.images[i][:, border & ~data.masks[i, 0]].median(1).values
                        for i in range(len(data))])
    within, between = [], skin.std(0).mean()
    for patient in set(data.patient_ids.tolist()):
        rows = skin[torch.from_numpy(data.patient_ids == patient)]
        if len(rows) > 1:
            within.append(rows.std(0).mean())
    assert torch.stack(within).mean() < 0.3 * between


def _best_threshold_balanced_accuracy(values: torch.Tensor, labels: torch.Tensor) -> float:
    """How well one threshold on ``values`` (high = melanoma) separates the classes."""
    return max(
        0.5 * float((values[labels == 1] >= t).float().mean()
                    + (values[labels == 0] < t).float().mean())
        for t in values.unique()
    )


def _cues(separation: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lesion area (D) and within-lesion colour spread (C) of melanomas and nevi."""
    data = make_dermoscopy(300, image_size=32, mix={"MEL": 1.0, "NV": 1.0}, seed=4,
                           artefacts=0.0, cue_separation=separation)
    area = data.masks.flatten(1).float().mean(1)
    inside = data.masks.expand_as(data.images)
    spread = torch.stack([image[mask].view(3, -1).std(1).mean()
                          for image, mask in zip(data.images, inside, strict=True)])
    return area, spread, data.labels


def test_melanomas_differ_from_nevi_by_the_abcd_cues_with_overlap():
    area, spread, labels = _cues(0.57)  # the default separation
    mel, nv = labels == 1, labels == 0
    assert area[mel].mean() > 1.5 * area[nv].mean()  # D: larger
    assert spread[mel].mean() > 1.4 * spread[nv].mean()  # C: more colours
    # overlapping: no single cue separates the classes
    assert 0.7 < _best_threshold_balanced_accuracy(area, labels) < 0.92
    assert 0.7 < _best_threshold_balanced_accuracy(spread, labels) < 0.92
    same_area, same_spread, same_labels = _cues(0.0)  # no separation: no difference
    ratio = same_area[same_labels == 1].mean() / same_area[same_labels == 0].mean()
    assert 0.8 < ratio < 1.25
    assert _best_threshold_balanced_accuracy(same_spread, same_labels) < 0.65


def test_skin4_classes_and_labels():
    data = make_dermoscopy(40, image_size=16, mix=SKIN4_MIX, binary=False, seed=0)
    assert data.class_names == tuple(SKIN4_MIX) == ("MEL", "NV", "BCC", "BKL")
    names = np.array(data.class_names)[data.labels.numpy()]
    assert (names == data.diagnoses).all()
    assert set(SKIN4_MIX) <= set(DIAGNOSES)
    # the paper's proportions: 1,113 MEL, 1,500 NV (of ISIC 2018's 6,705), 514 BCC, 1,099 BKL
    assert SKIN4_MIX == {"MEL": 1113.0, "NV": 1500.0, "BCC": 514.0, "BKL": 1099.0}
    counts = np.bincount(data.labels.numpy(), minlength=4)
    expected = np.array(list(SKIN4_MIX.values())) / sum(SKIN4_MIX.values()) * 40
    assert np.abs(counts - expected).max() < 1.0


def test_subset_and_patient_split(skin):
    split = split_by_patient(skin.patient_ids, skin.labels, (0.7, 0.1, 0.2), seed=0)
    test = skin.subset(split.test)
    assert isinstance(test, DermoscopyData) and len(test) == len(split.test)
    assert torch.equal(test.images, skin.images[torch.from_numpy(split.test)])
    assert (test.diagnoses == skin.diagnoses[split.test]).all()
    assert not set(test.patient_ids.tolist()) & set(skin.subset(split.train).patient_ids.tolist())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_images": 0}, "n_images"), ({"image_size": 8}, "image_size"),
    ({"n_images": 5, "n_patients": 6}, "n_patients"), ({"mix": {"XYZ": 1.0}}, "unknown"),
    ({"mix": {"NV": 1.0, "BKL": 1.0}}, "binary"), ({"cue_separation": 1.5}, "cue_separation"),
    ({"artefacts": -1.0}, "artefacts"), ({"mix": {"MEL": -1.0, "NV": 1.0}}, "frequencies"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dermoscopy(**{"n_images": 10, "image_size": 16, **kwargs})


def test_saves_a_grid_per_diagnosis(skin, tmp_path):
    import matplotlib.image

    path = save_dermoscopy_grid(skin, tmp_path / "g.png", per_class=3, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > height  # three diagnosis rows, four columns
    with pytest.raises(ValueError, match="per_class"):
        save_dermoscopy_grid(skin, tmp_path / "x.png", per_class=0)


def test_separable_field_equals_the_plane_waves():
    from fastinfluence.datasets.dermoscopy import _field

    axis = np.linspace(-1, 1, 23)
    got = _field(np.random.default_rng(5), axis, 7, 9.0)
    rng = np.random.default_rng(5)  # the same draws, evaluated wave by wave
    k, direction, phase = rng.uniform(0.3, 1.0, 7) * 9.0, rng.uniform(0, 2 * np.pi, 7), \
        rng.uniform(0, 2 * np.pi, 7)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    expected = sum(np.cos(kk * (np.cos(d) * x + np.sin(d) * y) + p)
                   for kk, d, p in zip(k, direction, phase, strict=True)) * np.sqrt(2 / 7)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_windowed_segment_distance_equals_brute_force_within_reach():
    from fastinfluence.datasets.dermoscopy import _segment_distance

    axis = np.linspace(-1, 1, 41)
    segments = np.random.default_rng(6).uniform(-1.1, 1.1, (5, 4))
    got = _segment_distance(axis, segments, 0.2)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    brute = np.full(x.shape, np.inf)
    for x0, y0, x1, y1 in segments:
        for r in range(len(axis)):
            for c in range(len(axis)):
                px, py = x[r, c], y[r, c]
                length2 = (x1 - x0) ** 2 + (y1 - y0) ** 2
                t = min(1.0, max(0.0, ((px - x0) * (x1 - x0) + (py - y0) * (y1 - y0)) / length2))
                d = np.hypot(px - x0 - t * (x1 - x0), py - y0 - t * (y1 - y0))
                brute[r, c] = min(brute[r, c], d)
    near = brute <= 0.2
    np.testing.assert_allclose(got[near], brute[near], rtol=1e-12)
    assert (got[~near] > 0.2).all()  # farther points are farther (inf or a larger distance)
