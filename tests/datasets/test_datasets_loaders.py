"""Real-format loaders, on miniature files written in the real formats."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from datasets_formats import MATLAB_HEADER, write_csv, write_figshare_slice, write_mat73
from PIL import Image

from fastinfluence.datasets import load_figshare_brain_tumour, load_isic2017, load_isic2018
from fastinfluence.datasets.isic import SKIN4_CLASSES, SKIN4_MAX_PER_CLASS

SLICES = [  # (file number, label 1..3, patient id, side)
    (1, 1, "100360", 16),
    (2, 1, "100360", 16),
    (3, 2, "MR029", 8),
    (4, 3, "112649", 16),
    (10, 2, "MR029", 8),
]


def slice_arrays(number, side):
    rng = np.random.default_rng(number)
    image = rng.integers(0, 900, size=(side, side)).astype(np.int16)
    image[0, :] = 1000  # a bright top row marks the orientation
    mask = np.zeros((side, side), dtype=bool)
    mask[side // 4 : side // 2, side // 2 :] = True
    return image, mask


@pytest.fixture
def figshare_root(tmp_path):
    for number, label, pid, side in SLICES:
        image, mask = slice_arrays(number, side)
        write_figshare_slice(tmp_path / f"{number}.mat", label, pid, image, mask)
    folds = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0]]).T  # MATLAB 10x1
    write_mat73(tmp_path / "cvind.mat", {"cvind": ("double", folds)})
    return tmp_path


def test_written_files_are_matlab_v73(figshare_root):
    path = figshare_root / "1.mat"
    assert path.read_bytes()[: len(MATLAB_HEADER)] == MATLAB_HEADER
    with h5py.File(path, "r") as handle:
        assert handle.userblock_size == 512
        assert handle["cjdata"]["PID"].dtype == np.uint16
        assert handle["cjdata"]["PID"].shape == (6, 1)  # MATLAB 1x6 char, transposed


def test_figshare_loader_reads_everything(figshare_root):
    data = load_figshare_brain_tumour(figshare_root, image_size=16)
    assert data.images.shape == (5, 1, 16, 16) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 0, 1, 2, 1]
    assert data.patient_ids.tolist() == ["100360", "100360", "MR029", "112649", "MR029"]
    assert data.folds.tolist() == [1, 2, 3, 4, 5]  # file k takes cvind(k): 10.mat -> 5
    image, mask = slice_arrays(1, 16)
    expected = torch.from_numpy(image / image.max()).float()
    torch.testing.assert_close(data.images[0, 0], expected)  # MATLAB orientation, max-scaled
    assert torch.equal(data.masks[0, 0], torch.from_numpy(mask))
    # the 8x8 slices were resized; their bright first row survives
    assert data.images[2, 0, 0].min() > data.images[2, 0, 4:].mean()
    assert data.masks[2, 0].float().mean().item() == pytest.approx(mask.mean(), abs=0.05)


def test_figshare_native_size_needs_equal_sizes(figshare_root):
    with pytest.raises(ValueError, match="image_size"):
        load_figshare_brain_tumour(figshare_root, image_size=None)
    for number in (3, 10):
        (figshare_root / f"{number}.mat").unlink()
    data = load_figshare_brain_tumour(figshare_root, image_size=None)
    assert data.images.shape == (3, 1, 16, 16)


def test_figshare_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_figshare_brain_tumour(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_figshare_brain_tumour(tmp_path, image_size=2.5)
    image, mask = slice_arrays(1, 8)
    write_figshare_slice(tmp_path / "1.mat", 4, "x", image, mask)
    with pytest.raises(ValueError, match="label"):
        load_figshare_brain_tumour(tmp_path)
    write_mat73(tmp_path / "1.mat", {"other": ("double", np.zeros((1, 1)))})
    with pytest.raises(ValueError, match="cjdata"):
        load_figshare_brain_tumour(tmp_path)


COLOURS = {
    "ISIC_0000000": (200, 40, 40),
    "ISIC_0000001": (40, 200, 40),
    "ISIC_0000002": (40, 40, 200),
    "ISIC_0000003": (120, 120, 120),
}


def write_images(folder, superpixels=False):
    folder.mkdir()
    for image_id, colour in COLOURS.items():
        Image.new("RGB", (30, 20), colour).save(folder / f"{image_id}.jpg", quality=95)
        if superpixels:
            Image.new("RGB", (30, 20), (0, 0, 0)).save(folder / f"{image_id}_superpixels.png")


def test_isic2017(tmp_path):
    write_images(tmp_path / "images", superpixels=True)
    csv_path = tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv"
    write_csv(
        csv_path,
        ["seborrheic_keratosis", "image_id", "melanoma"],
        [
            [0.0, "ISIC_0000000", 1.0],
            [1.0, "ISIC_0000001", 0.0],
            [0.0, "ISIC_0000002", 0.0],
            [0.0, "ISIC_0000003", 1.0],
        ],
    )
    data = load_isic2017(tmp_path / "images", csv_path, image_size=12)
    assert data.images.shape == (4, 3, 12, 12) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [1, 0, 0, 1] and data.class_names == ("benign", "melanoma")
    assert data.image_ids.tolist() == list(COLOURS)
    for k, colour in enumerate(COLOURS.values()):  # the image, not its superpixel map
        mean = data.images[k].mean(dim=(1, 2)) * 255
        assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=6)
    three = load_isic2017(tmp_path / "images", csv_path, image_size=None, binary=False)
    assert three.labels.tolist() == [0, 1, 2, 0] and three.images.shape[-2:] == (20, 30)


def test_isic2018(tmp_path):
    write_images(tmp_path / "images")
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC", "extra"]
    hot = {
        "ISIC_0000000": "MEL",
        "ISIC_0000001": "VASC",
        "ISIC_0000002": "NV",
        "ISIC_0000003": "BKL",
    }
    rows = [[i] + [float(c == d) for c in header[1:8]] + ["x"] for i, d in hot.items()]
    write_csv(tmp_path / "gt.csv", header, rows)
    data = load_isic2018(tmp_path / "images", tmp_path / "gt.csv", image_size=8)
    assert data.labels.tolist() == [0, 6, 1, 4]
    assert data.class_names == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    binary = load_isic2018(tmp_path / "images", tmp_path / "gt.csv", image_size=8, binary=True)
    assert binary.labels.tolist() == [1, 0, 0, 0]


def test_isic2018_skin4_selection(tmp_path):
    """The denoising paper's SKIN4: MEL, NV, BCC, BKL only, nevi capped at random."""
    folder = tmp_path / "images"
    folder.mkdir()
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    diagnoses = ["NV", "MEL", "NV", "DF", "BKL", "NV", "BCC", "NV", "VASC", "NV"]
    rows = []
    for k, diagnosis in enumerate(diagnoses):
        image_id = f"ISIC_{k:07d}"
        Image.new("RGB", (6, 6), (10 * k, 0, 0)).save(folder / f"{image_id}.jpg")
        rows.append([image_id] + [float(c == diagnosis) for c in header[1:]])
    write_csv(tmp_path / "gt.csv", header, rows)
    data = load_isic2018(folder, tmp_path / "gt.csv", image_size=None, classes=SKIN4_CLASSES,
                         max_per_class={"NV": 2}, seed=0)
    assert data.class_names == ("MEL", "NV", "BCC", "BKL") == SKIN4_CLASSES
    kept = [diagnoses[int(i[5:])] for i in data.image_ids]
    assert sorted(kept) == ["BCC", "BKL", "MEL", "NV", "NV"]  # no DF, VASC; two of five NV
    assert [SKIN4_CLASSES[label] for label in data.labels.tolist()] == kept
    assert list(data.image_ids) == sorted(data.image_ids)  # CSV order kept
    choices = {
        tuple(load_isic2018(folder, tmp_path / "gt.csv", image_size=None, classes=SKIN4_CLASSES,
                            max_per_class={"NV": 2}, seed=seed).image_ids)
        for seed in range(6)
    }
    assert len(choices) > 1  # the seed picks which nevi
    assert SKIN4_MAX_PER_CLASS == {"NV": 1500}
    with pytest.raises(ValueError, match="unknown ISIC 2018 diagnoses"):
        load_isic2018(folder, tmp_path / "gt.csv", classes=("MEL", "SCC"))


def test_isic_bad_input(tmp_path):
    write_images(tmp_path / "images")
    write_csv(tmp_path / "no_mel.csv", ["image_id", "seborrheic_keratosis"], [["ISIC_0000000", 0]])
    with pytest.raises(ValueError, match="melanoma"):
        load_isic2017(tmp_path / "images", tmp_path / "no_mel.csv")
    write_csv(
        tmp_path / "missing.csv",
        ["image_id", "melanoma", "seborrheic_keratosis"],
        [["ISIC_9999999", 0, 0]],
    )
    with pytest.raises(FileNotFoundError, match="ISIC_9999999"):
        load_isic2017(tmp_path / "images", tmp_path / "missing.csv")
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    write_csv(tmp_path / "two.csv", header, [["ISIC_0000000", 1, 1, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="one-hot"):
        load_isic2018(tmp_path / "images", tmp_path / "two.csv")
