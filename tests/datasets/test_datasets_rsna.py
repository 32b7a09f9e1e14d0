"""The RSNA pneumonia loader, on miniature files written in the challenge's formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets_formats import write_csv, write_dicom_film
from PIL import Image

from fastinfluence.datasets import ChestXrayData, load_rsna_pneumonia

LABEL_HEADER = ["patientId", "x", "y", "width", "height", "Target"]
CLASS_HEADER = ["patientId", "class"]
# patientId -> (class, boxes (x, y, width, height) on the stored 40 x 40 film)
PATIENTS = {
    "0004cfab-14fd": ("No Lung Opacity / Not Normal", []),
    "00313ee0-9eaa": ("Lung Opacity", [(4.0, 8.0, 12.0, 20.0), (24.0, 10.0, 8.0, 8.0)]),
    "00322d4d-1c29": ("Normal", []),
    "003d8fa0-6bf1": ("Lung Opacity", [(20.0, 0.0, 20.0, 40.0)]),
}


def film(number: int) -> np.ndarray:
    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 200, size=(40, 40)).astype(np.uint8)
    pixels[:4] = 255  # a bright top band marks the orientation
    return pixels


def write_rsna(root, *, image_format="dcm"):
    images = root / "stage_2_train_images"
    images.mkdir()
    label_rows, class_rows = [], []
    for k, (pid, (name, boxes)) in enumerate(PATIENTS.items()):
        if image_format == "dcm":
            write_dicom_film(images / f"{pid}.dcm", film(k))
        else:
            Image.fromarray(film(k)).save(images / f"{pid}.{image_format}")
        for box in boxes or [None]:
            label_rows.append([pid, *(box or ["", "", "", ""]), int(box is not None)])
            class_rows.append([pid, name])  # the class file repeats a patient once per box
    write_csv(root / "stage_2_train_labels.csv", LABEL_HEADER, label_rows)
    write_csv(root / "stage_2_detailed_class_info.csv", CLASS_HEADER, class_rows)
    return images, root / "stage_2_train_labels.csv", root / "stage_2_detailed_class_info.csv"


def expected_mask(boxes, size=40):
    mask = np.zeros((size, size), dtype=bool)
    for x, y, w, h in boxes:
        mask[int(y):int(y + h), int(x):int(x + w)] = True
    return mask


@pytest.mark.parametrize("image_format", ["dcm", "png"])
def test_reads_films_labels_and_boxes(tmp_path, image_format):
    if image_format == "dcm":
        pytest.importorskip("pydicom", reason="DICOM films need pydicom")
    data = load_rsna_pneumonia(*write_rsna(tmp_path, image_format=image_format), image_size=None)
    assert isinstance(data, ChestXrayData)
    assert data.image_ids.tolist() == list(PATIENTS) == data.patient_ids.tolist()
    assert data.labels.tolist() == [2, 1, 0, 1]
    assert data.images.shape == data.masks.shape == (4, 1, 40, 40)
    assert data.images.dtype == torch.float32
    for k, (_, boxes) in enumerate(PATIENTS.values()):
        np.testing.assert_allclose(data.images[k, 0].numpy(), film(k) / 255.0, atol=1e-6)
        np.testing.assert_array_equal(data.masks[k, 0].numpy(), expected_mask(boxes))


def test_resizes_films_and_masks(tmp_path):
    data = load_rsna_pneumonia(*write_rsna(tmp_path, image_format="png"), image_size=20)
    assert data.images.shape == (4, 1, 20, 20)
    assert data.images[:, 0, :2].mean() > 0.95  # the bright top band stays on top
    # boxes scale with the film: the right half of patient 3, 40 of 40 rows
    np.testing.assert_array_equal(data.masks[3, 0].numpy(), expected_mask([(10, 0, 10, 20)], 20))
    assert not data.masks[[0, 2]].any()


def test_monochrome1_is_inverted(tmp_path):
    pytest.importorskip("pydicom", reason="DICOM films need pydicom")
    images, labels_csv, class_csv = write_rsna(tmp_path)
    pid = next(iter(PATIENTS))
    write_dicom_film(images / f"{pid}.dcm", film(0), monochrome1=True)
    data = load_rsna_pneumonia(images, labels_csv, class_csv, image_size=None)
    np.testing.assert_allclose(data.images[0, 0].numpy(), 1 - film(0) / 255.0, atol=1e-6)


def test_bad_input(tmp_path):
    images, labels_csv, class_csv = write_rsna(tmp_path, image_format="png")
    bad = tmp_path / "bad.csv"
    write_csv(bad, CLASS_HEADER, [[pid, "Pneumonia"] for pid in PATIENTS])
    with pytest.raises(ValueError, match="unknown class 'Pneumonia'"):
        load_rsna_pneumonia(images, labels_csv, bad)
    write_csv(bad, CLASS_HEADER, [[pid, "Normal"] for pid in PATIENTS])
    with pytest.raises(ValueError, match="00313ee0-9eaa: class 'Normal' but Target 1"):
        load_rsna_pneumonia(images, labels_csv, bad)
    write_csv(bad, ["patientId", "label"], [["a", "Normal"]])
    with pytest.raises(ValueError, match="lacks columns"):
        load_rsna_pneumonia(images, labels_csv, bad)
    (images / "00322d4d-1c29.png").unlink()
    with pytest.raises(FileNotFoundError, match="00322d4d-1c29"):
        load_rsna_pneumonia(images, labels_csv, class_csv)
