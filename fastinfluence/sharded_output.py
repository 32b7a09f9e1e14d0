"""Resumable, sharded output of long influence runs (docs/design.md §2, "Resumable output").

A directory ``DIR`` holds, for one model, training set, validation set and set of options:

* ``manifest.json`` — the fingerprints of all four (:func:`model_fingerprint`,
  :func:`data_fingerprint`, the options that change the result), the inverse-HVP ``s`` entry
  (file, SHA-256, its solve report) and one entry per output kind (the scored data's
  fingerprint, row count, chunk size, dtype and the SHA-256 of the ``s`` it was computed with);
* ``ihvp.npy`` — ``s = (H + λI)^{-1}∇L(D_val)``, reused by an ``Influence`` built on the same
  fingerprint instead of solving again;
* ``<kind>-<index:05d>.npy`` — rows ``[index·chunk, (index+1)·chunk)`` of an output
  (``scores``, ``self-influence``, ``pairwise``, ``perturbation``).

Every file is written under a temporary name in the same directory, flushed to disk, then
renamed over its final name (``os.replace`` is atomic on POSIX), so a killed run leaves whole
chunks or none; a rerun skips the chunks that exist. A directory holding output of other
settings is refused with a :class:`SettingsMismatchError` (a ``ValueError``) naming what
differs.

Under ``torch.distributed`` every rank runs the same chunk loop (the backend splits each
call's samples over ranks and gathers the result), and only rank 0 writes. Which chunks to
skip is decided once, before the first chunk, from the files every rank sees, so ``DIR`` must
be on a file system shared by all ranks (a rank seeing other files would run other
collectives and hang).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinfluence.labelled_data import LabelledData, named_inputs

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IHVP_FILE = "ihvp.npy"
TEMPORARY_SUFFIX = ".tmp"
OUTPUT_KINDS = ("scores", "self-influence", "pairwise", "perturbation")
DEFAULT_CHUNK_SIZE = 4096
"""Rows per chunk file when ``chunk_size`` is not given."""
FINGERPRINT_SAMPLES = 16
"""Samples hashed at each end of a data set: a cheap check that the data is the same, fixed so
that a change of batch size does not change the fingerprint."""


class SettingsMismatchError(ValueError):
    """An output directory holds output of other settings; the message names each
    difference."""


def is_writer(group: Any | None = None) -> bool:
    """Whether this process writes files: rank 0 of ``group`` (default: the default group)
    when ``torch.distributed`` is initialised, or a process that is not distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()
                and distributed.get_rank(group) != 0)


def tensor_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``, in the given order."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def qualified_name(thing: Any) -> str | None:
    """``module.qualname`` of a class or function (``None`` for ``None``): what a manifest
    records of a callable, since its code cannot be hashed reliably."""
    if thing is None:
        return None
    named = thing if hasattr(thing, "__qualname__") else type(thing)
    return f"{named.__module__}.{named.__qualname__}"


def model_fingerprint(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                      model_dtype: torch.dtype) -> dict[str, str]:
    """The model's class and a SHA-256 of every parameter and buffer (``tensors``, by name)."""
    return {
        "class": qualified_name(type(model)),
        "dtype": str(model_dtype),
        "sha256": tensor_digest(sorted(tensors.items())),
    }


def data_fingerprint(data: LabelledData) -> dict[str, Any]:
    """The number of samples and a SHA-256 of the first and last :data:`FINGERPRINT_SAMPLES`
    samples (inputs and labels, read as the scorers read them)."""
    n = len(data)
    ends = sorted({*range(min(FINGERPRINT_SAMPLES, n)),
                   *range(max(0, n - FINGERPRINT_SAMPLES), n)})
    part = data.subset(torch.tensor(ends, dtype=torch.int64))
    tensors = []
    for inputs, targets in part.batches(torch.device("cpu"), torch.float64):
        tensors += [*((f"x{label}", tensor) for label, tensor in named_inputs(inputs, "x")),
                    ("y", targets)]
    return {"num_samples": n, "sha256": tensor_digest(tensors)}


def atomic_save(path: Path, array: np.ndarray | bytes) -> None:
    """Write ``array`` (``.npy``) or raw bytes to ``path`` through a temporary file in the same
    directory, flushed to disk and renamed over ``path``: readers see the old file or the
    whole new one."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    with open(temporary, "wb") as handle:
        if isinstance(array, bytes):
            handle.write(array)
        else:
            np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` on the CPU as a numpy array (outputs and ``s`` are in the computation's
    dtype, float32 or float64, never a half type numpy lacks)."""
    return tensor.detach().to("cpu").numpy()


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _differences(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: found vs expected`` for each (nested) key whose values differ."""
    lines = []
    for key in sorted(set(found) | set(expected)):
        here, there = found.get(key), expected.get(key)
        if isinstance(here, dict) and isinstance(there, dict):
            lines += _differences(here, there, f"{prefix}{key}.")
        elif here != there:
            lines.append(f"{prefix}{key}: {there!r} in the directory vs {here!r} now")
    return lines


class OutputDirectory:
    """The manifest of a resumable output directory for one set of settings.

    Args:
        path: the directory (created by the writing process if missing).
        settings: ``{"model", "train", "val", "options"}`` fingerprints; a directory whose
            manifest holds other settings raises ``ValueError`` naming each difference.
        group: the process group whose rank 0 writes (default: the default group).
    """

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any],
                 group: Any | None = None) -> None:
        self.path = Path(path)
        self.writer = is_writer(group)
        settings = _as_json(settings)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out={str(path)!r} exists and is not a directory")
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            self.manifest = json.loads(manifest_path.read_text())
            differences = _differences(settings, self.manifest.get("settings", {}))
            if self.manifest.get("format") != FORMAT_VERSION:
                differences.insert(0, f"format: {self.manifest.get('format')!r} in the "
                                      f"directory vs {FORMAT_VERSION} now")
            if differences:
                raise SettingsMismatchError(
                    f"out={str(path)!r} holds influence output of other settings; use another "
                    "directory or the same settings. Differences: " + "; ".join(differences)
                )
        else:
            self.manifest = {"format": FORMAT_VERSION, "settings": settings, "ihvp": None,
                             "outputs": {}}
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            # A run killed mid-write leaves a temporary file; no one else writes here.
            for stale in self.path.glob("*" + TEMPORARY_SUFFIX):
                stale.unlink()
            self._save_manifest()

    def _save_manifest(self) -> None:
        if self.writer:
            text = json.dumps(self.manifest, indent=2, sort_keys=True)
            atomic_save(self.path / MANIFEST, text.encode())

    def load_ihvp(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The saved ``s`` and its solve report (as a dict), or ``None`` when none is saved (or
        its file was deleted: then ``s`` is solved and saved again)."""
        entry = self.manifest.get("ihvp")
        if entry is None or not (self.path / entry["file"]).exists():
            return None
        array = np.load(self.path / entry["file"], allow_pickle=False)
        if hashlib.sha256(array.tobytes()).hexdigest() != entry["sha256"]:
            raise ValueError(
                f"{self.path / entry['file']} does not match the SHA-256 in its manifest: the "
                "file was changed or damaged; delete it to solve again"
            )
        return array, entry["report"]

    def save_ihvp(self, ihvp: torch.Tensor, report: dict[str, Any]) -> None:
        """Save ``s`` (the file first, then the manifest entry that names it)."""
        array = to_numpy(ihvp)
        if self.writer:
            atomic_save(self.path / IHVP_FILE, array)
        self.manifest["ihvp"] = {"file": IHVP_FILE, "report": report,
                                 "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
        self._save_manifest()

    def output(self, kind: str, description: dict[str, Any], num_rows: int,
               row_shape: tuple[int, ...], dtype: torch.dtype,
               chunk_size: int) -> ChunkedOutput:
        """The chunk files of output ``kind`` over ``num_rows`` rows of shape ``row_shape``.

        ``description`` says what was scored (data fingerprints, the SHA-256 of ``s``); an
        existing entry of ``kind`` with another description, row count, shape, dtype or chunk
        size raises ``ValueError`` naming the difference.
        """
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")
        entry = _as_json({**description, "num_rows": num_rows, "row_shape": list(row_shape),
                          "dtype": str(dtype), "chunk_size": chunk_size})
        existing = self.manifest["outputs"].get(kind)
        if existing is not None:
            differences = _differences(entry, existing)
            if differences:
                raise SettingsMismatchError(
                    f"out={str(self.path)!r} holds {kind} of other settings; use another "
                    "directory or the same settings. Differences: " + "; ".join(differences)
                )
        else:
            self.manifest["outputs"][kind] = entry
            self._save_manifest()
        return ChunkedOutput(self.path, kind, num_rows, row_shape, dtype, chunk_size,
                             self.writer)


class ChunkedOutput:
    """The chunk files ``<kind>-<index:05d>.npy`` of one output; see :class:`OutputDirectory`.

    Which chunks are finished is read once, at construction, so that every rank of a
    distributed run takes the same decisions (see the module docstring).
    """

    def __init__(self, path: Path, kind: str, num_rows: int, row_shape: tuple[int, ...],
                 dtype: torch.dtype, chunk_size: int, writer: bool) -> None:
        self.path = path
        self.kind = kind
        self.num_rows = num_rows
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.writer = writer
        self.num_chunks = -(-num_rows // chunk_size)
        self.finished = {index for index in range(self.num_chunks)
                         if self.file(index).exists()}
        self._in_memory: dict[int, torch.Tensor] = {}
        """Chunks computed by a process that does not write (ranks other than 0)."""

    def file(self, index: int) -> Path:
        """The path of chunk ``index``."""
        return self.path / f"{self.kind}-{index:05d}.npy"

    def rows(self, index: int) -> torch.Tensor:
        """The row indices of chunk ``index``."""
        start = index * self.chunk_size
        return torch.arange(start, min(start + self.chunk_size, self.num_rows))

    def missing(self) -> Iterator[int]:
        """The indices of the chunks still to compute, in order."""
        return (index for index in range(self.num_chunks) if index not in self.finished)

    def write(self, index: int, values: torch.Tensor) -> None:
        """Store chunk ``index`` (atomically, on the writing process)."""
        expected = (len(self.rows(index)), *self.row_shape)
        if tuple(values.shape) != expected:
            raise ValueError(f"chunk {index} of {self.kind} has shape {tuple(values.shape)}, "
                             f"expected {expected}")
        if self.writer:
            atomic_save(self.file(index), to_numpy(values))
        else:
            self._in_memory[index] = values.detach().to("cpu")

    def read(self) -> torch.Tensor:
        """Every chunk, concatenated into one ``[num_rows, *row_shape]`` tensor of ``dtype``
        (chunk files are memory-mapped while copied)."""
        result = torch.empty((self.num_rows, *self.row_shape), dtype=self.dtype)
        for index in range(self.num_chunks):
            rows = self.rows(index)
            start, stop = index * self.chunk_size, index * self.chunk_size + len(rows)
            if index in self._in_memory:
                result[start:stop] = self._in_memory[index]
                continue
            array = np.load(self.file(index), mmap_mode="r", allow_pickle=False)
            expected = (len(rows), *self.row_shape)
            if array.shape != expected:
                raise ValueError(f"{self.file(index)} has shape {array.shape}, expected "
                                 f"{expected}: the file was changed; delete it to recompute")
            result.numpy()[start:stop] = array
        return result


def read_output(path: str | os.PathLike, kind: str) -> torch.Tensor:
    """Read a finished output ``kind`` of directory ``path`` back as one tensor (for use
    without the model, e.g. after ``python -m fastinfluence score``)."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    entry = manifest["outputs"].get(kind)
    if entry is None:
        raise ValueError(f"{path} holds no {kind} output; it holds {sorted(manifest['outputs'])}")
    dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
    chunks = ChunkedOutput(Path(path), kind, entry["num_rows"], tuple(entry["row_shape"]),
                           dtype, entry["chunk_size"], writer=False)
    unfinished = sorted(set(range(chunks.num_chunks)) - chunks.finished)
    if unfinished:
        raise ValueError(f"{path}: {kind} is unfinished, chunks {unfinished} are missing; "
                         "rerun with the same settings to complete it")
    return chunks.read()
