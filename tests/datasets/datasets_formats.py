"""Writers of the real data sets' file formats, for the loader tests."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

MATLAB_HEADER = (
    b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
    b"HDF5 schema 1.00 ."
)


def write_mat73(path: Path, variables: dict[str, object]) -> None:
    """Write ``variables`` as MATLAB v7.3 does: HDF5 behind a 512-byte MATLAB header, arrays
    transposed (MATLAB is column-major), ``MATLAB_class`` attributes, structs as groups.
    A variable is ``(matlab_class, array in MATLAB orientation)`` or a dict (a struct)."""
    with h5py.File(path, "w", userblock_size=512) as handle:
        for name, value in variables.items():
            _write(handle, name, value)
    block = MATLAB_HEADER.ljust(116, b" ") + b"\x00" * 8 + (0x0200).to_bytes(2, "little") + b"IM"
    with path.open("r+b") as raw:
        raw.write(block.ljust(512, b"\x00"))


def _write(parent: h5py.Group, name: str, value: object) -> None:
    if isinstance(value, dict):
        group = parent.create_group(name)
        group.attrs["MATLAB_class"] = np.bytes_("struct")
        for key, item in value.items():
            _write(group, key, item)
        return
    matlab_class, array = value
    data = parent.create_dataset(name, data=np.asarray(array).T)
    data.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    if matlab_class == "char":
        data.attrs["MATLAB_int_decode"] = np.int32(2)


def write_figshare_slice(
    path: Path, label: int, pid: str, image: np.ndarray, mask: np.ndarray
) -> None:
    rows, cols = np.nonzero(mask)
    border = np.stack([rows, cols], axis=1).ravel().astype(np.float64)[None, :]
    write_mat73(
        path,
        {
            "cjdata": {
                "label": ("double", np.array([[float(label)]])),
                "PID": ("char", np.array([[ord(c) for c in pid]], dtype=np.uint16)),
                "image": ("int16", image.astype(np.int16)),
                "tumorBorder": ("double", border),
                "tumorMask": ("logical", mask.astype(np.uint8)),
            }
        },
    )


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_dicom_film(path: Path, pixels: np.ndarray, *, monochrome1: bool = False) -> None:
    """An 8-bit grayscale DICOM film as RSNA's (explicit VR little endian, uncompressed)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientID = path.stem
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)
