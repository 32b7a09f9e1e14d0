"""The storage of resumable, sharded output (docs/design.md §2, "Resumable output"): files,
manifest and checksums. What is fingerprinted is :mod:`fastinfluence.fingerprints`; an
``Influence``'s use of a directory (reuse of ``s``, the chunk loop) is
:mod:`fastinfluence.output_session`.

A directory ``DIR`` holds, for one model, training set, validation set and set of options:

* ``manifest.json`` — the fingerprints of all four
  (:func:`~fastinfluence.fingerprints.model_fingerprint`,
  :func:`~fastinfluence.fingerprints.data_fingerprint`, the options that change the result,
  the loss and output selector by :func:`~fastinfluence.fingerprints.callable_fingerprints`),
  the inverse-HVP ``s`` entry (file, SHA-256, its solve
  report), one entry per output kind (the scored data's fingerprint, row count, chunk size,
  dtype and the SHA-256 of the ``s`` it was computed with) and the size and SHA-256 of every
  file written (:func:`file_record`);
* ``ihvp.npy`` — ``s = (H + λI)^{-1}∇L(D_val)``, reused by an ``Influence`` built on the same
  fingerprint instead of solving again;
* ``<kind>-<index:05d>.npy`` — rows ``[index·chunk, (index+1)·chunk)`` of an output
  (``scores``, ``self-influence``, ``pairwise``, ``perturbation``; the gradient store's
  ``projected-gradients``, and ``projected-curvature`` with one ``[k, k]`` row per chunk of
  training samples).

Every file is written under a temporary name in the same directory, flushed to disk, then
renamed over its final name (``os.replace`` is atomic on POSIX), so a killed run leaves whole
chunks or none; then its size and SHA-256 are recorded in the manifest. A rerun skips the
chunks whose files match their record; a file that does not (truncated, changed) is computed
again with a warning naming it. A directory holding output of other settings is refused with a
:class:`SettingsMismatchError` (a ``ValueError``) naming what differs.

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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinfluence.errors import SettingsMismatchError

FORMAT_VERSION = 2
"""2: the loss and output selector fingerprinted by state and behaviour, and every file's size
and SHA-256 recorded (1 recorded their qualified names and no file checksums)."""
MANIFEST = "manifest.json"
IHVP_FILE = "ihvp.npy"
TEMPORARY_SUFFIX = ".tmp"
OUTPUT_KINDS = ("scores", "self-influence", "pairwise", "perturbation", "projected-gradients",
                "projected-curvature")
DEFAULT_CHUNK_SIZE = 4096
"""Rows per chunk file when ``chunk_size`` is not given."""


def is_writer(group: Any | None = None) -> bool:
    """Whether this process writes files: rank 0 of ``group`` (default: the default group)
    when ``torch.distributed`` is initialised, or a process that is not distributed."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()
                and distributed.get_rank(group) != 0)


def file_record(path: Path) -> dict[str, Any]:
    """The size and SHA-256 of the file at ``path``, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def ihvp_sha256(ihvp: torch.Tensor) -> str:
    """The SHA-256 of ``s``'s bytes, as the manifest records it and chunks name their ``s``."""
    return hashlib.sha256(to_numpy(ihvp).tobytes()).hexdigest()


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


def _relative_difference(found: list[float], expected: list[float]) -> float:
    """The largest ``|found − expected|`` relative to the largest ``|expected|`` (NaN equals
    NaN; another length differs infinitely)."""
    here = torch.tensor(found, dtype=torch.float64)
    there = torch.tensor(expected, dtype=torch.float64)
    if here.shape != there.shape:
        return float("inf")
    gaps = (here - there).abs()
    gaps[here.isnan() & there.isnan()] = 0
    scale = there.abs().nan_to_num(0).max().item() if len(there) else 0.0
    return gaps.max().item() / max(scale, torch.finfo(torch.float64).tiny) if len(there) else 0.0


def _differences(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: found vs expected`` for each (nested) key whose values differ; probe values
    (``{"approximately": [...], "rtol": r}``) differ when further apart than ``r`` relative
    to the largest."""
    lines = []
    for key in sorted(set(found) | set(expected)):
        here, there = found.get(key), expected.get(key)
        if (isinstance(here, dict) and isinstance(there, dict)
                and "approximately" in here and "approximately" in there):
            gap = _relative_difference(here["approximately"], there["approximately"])
            if not gap <= here["rtol"]:
                lines.append(f"{prefix}{key}: other values on the probe (the model's outputs "
                             f"for the first training samples), up to {gap:.3g} apart relative "
                             f"to the largest")
        elif isinstance(here, dict) and isinstance(there, dict):
            lines += _differences(here, there, f"{prefix}{key}.")
        elif here != there:
            lines.append(f"{prefix}{key}: {there!r} in the directory vs {here!r} now")
    return lines


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of directory ``path``, refused clearly when another format wrote it."""
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise SettingsMismatchError(
            f"{str(path)!r} was written by another version of fastinfluence (manifest "
            f"format {manifest.get('format')!r}, this version writes {FORMAT_VERSION}, which "
            "fingerprints the loss by its behaviour and checksums every file); use another "
            "directory, or delete it to compute again"
        )
    return manifest


class OutputDirectory:
    """The manifest of a resumable output directory for one set of settings.

    Args:
        path: the directory (created by the writing process if missing).
        settings: ``{"model", "train", "val", "options"}`` fingerprints; a directory whose
            manifest holds other settings raises ``ValueError`` naming each difference.
            ``None`` opens the directory as written, whatever its settings, for reading only.
        group: the process group whose rank 0 writes (default: the default group).
    """

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any] | None,
                 group: Any | None = None) -> None:
        self.path = Path(path)
        self.writer = settings is not None and is_writer(group)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out={str(path)!r} exists and is not a directory")
        if (self.path / MANIFEST).exists():
            self.manifest = _read_manifest(self.path)
            differences = ([] if settings is None else
                           _differences(_as_json(settings), self.manifest["settings"]))
            if differences:
                raise SettingsMismatchError(
                    f"out={str(path)!r} holds influence output of other settings; use another "
                    "directory or the same settings. Differences: " + "; ".join(differences)
                )
        elif settings is None:
            raise ValueError(f"{str(path)!r} holds no influence output (no {MANIFEST})")
        else:
            self.manifest = {"format": FORMAT_VERSION, "settings": _as_json(settings),
                             "ihvp": None, "outputs": {}, "files": {}}
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

    def damage(self, name: str) -> str | None:
        """How file ``name`` differs from the size and SHA-256 recorded when it was written
        (``None`` when it matches, or when it is missing or has no record: then it was never
        finished)."""
        record = self.manifest["files"].get(name)
        path = self.path / name
        if record is None or not path.exists():
            return None
        found = file_record(path)
        if found["bytes"] != record["bytes"]:
            return f"{found['bytes']} bytes, {record['bytes']} written"
        if found["sha256"] != record["sha256"]:
            return "its SHA-256 differs from the one written"
        return None

    def finished(self, name: str) -> bool:
        """Whether file ``name`` exists with a record (its size and SHA-256 are checked by
        :meth:`damage`)."""
        return name in self.manifest["files"] and (self.path / name).exists()

    def save(self, name: str, array: np.ndarray) -> None:
        """Write ``array`` to file ``name`` (atomically), then record its size and SHA-256 in
        the manifest (on the writing process)."""
        if self.writer:
            atomic_save(self.path / name, array)
            self.manifest["files"][name] = file_record(self.path / name)
            self._save_manifest()

    def load_ihvp(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The saved ``s`` and its solve report (as a dict), or ``None`` when none is saved,
        its file was deleted, or it is damaged (with a warning naming it): then ``s`` is solved
        and saved again."""
        entry = self.manifest["ihvp"]
        if entry is None or not self.finished(entry["file"]):
            return None
        damage = self.damage(entry["file"])
        if damage is not None:
            warnings.warn(f"{self.path / entry['file']} is damaged ({damage}); solving s again",
                          stacklevel=5)
            return None
        return np.load(self.path / entry["file"], allow_pickle=False), entry["report"]

    def save_ihvp(self, ihvp: torch.Tensor, report: dict[str, Any]) -> None:
        """Save ``s`` (the file and its record first, then the manifest entry that names it)."""
        array = to_numpy(ihvp)
        self.save(IHVP_FILE, array)
        self.manifest["ihvp"] = {"file": IHVP_FILE, "report": report,
                                 "sha256": ihvp_sha256(ihvp)}
        self._save_manifest()

    def output(self, kind: str, description: dict[str, Any], num_rows: int,
               row_shape: tuple[int, ...], dtype: torch.dtype,
               chunk_size: int) -> ChunkedOutput:
        """The chunk files of output ``kind`` over ``num_rows`` rows of shape ``row_shape``.

        ``description`` says what was scored (data fingerprints, the SHA-256 of ``s``); an
        existing entry of ``kind`` with another description, row count, shape, dtype or chunk
        size raises ``ValueError`` naming the difference. A chunk file that does not match
        its record is computed again, with a warning naming it.
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
        chunks = ChunkedOutput(self, kind, num_rows, row_shape, dtype, chunk_size)
        for index, damage in sorted(chunks.damaged.items()):
            warnings.warn(f"{chunks.file(index)} is damaged ({damage}); computing it again",
                          stacklevel=5)
        return chunks


class ChunkedOutput:
    """The chunk files ``<kind>-<index:05d>.npy`` of one output; see :class:`OutputDirectory`.

    Which chunks are finished (their file matches the size and SHA-256 recorded when it was
    written) and which are damaged (``{index: how}``) is read once, at construction, so that
    every rank of a distributed run takes the same decisions (see the module docstring).
    """

    def __init__(self, directory: OutputDirectory, kind: str, num_rows: int,
                 row_shape: tuple[int, ...], dtype: torch.dtype, chunk_size: int) -> None:
        self.directory = directory
        self.path = directory.path
        self.kind = kind
        self.num_rows = num_rows
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.num_chunks = -(-num_rows // chunk_size)
        self.damaged: dict[int, str] = {}
        self.finished: set[int] = set()
        for index in range(self.num_chunks):
            if directory.finished(self.file(index).name):
                damage = directory.damage(self.file(index).name)
                if damage is None:
                    self.finished.add(index)
                else:
                    self.damaged[index] = damage
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
        if self.directory.writer:
            self.directory.save(self.file(index).name, to_numpy(values))
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
            result.numpy()[start:stop] = self.chunk(index)
        return result

    def chunk(self, index: int) -> np.ndarray:
        """Chunk ``index``'s file, memory-mapped, checked to have its rows' shape."""
        array = np.load(self.file(index), mmap_mode="r", allow_pickle=False)
        expected = (len(self.rows(index)), *self.row_shape)
        if array.shape != expected:
            raise ValueError(f"{self.file(index)} has shape {array.shape}, expected "
                             f"{expected}: the file was changed; delete it to recompute")
        return array


def read_output(path: str | os.PathLike, kind: str) -> torch.Tensor:
    """Read a finished output ``kind`` of directory ``path`` back as one tensor (for use
    without the model, e.g. after ``python -m fastinfluence score``); a missing or damaged
    chunk raises ``ValueError`` naming it."""
    directory = OutputDirectory(path, None)
    entry = directory.manifest["outputs"].get(kind)
    if entry is None:
        raise ValueError(f"{path} holds no {kind} output; it holds "
                         f"{sorted(directory.manifest['outputs'])}")
    dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
    chunks = ChunkedOutput(directory, kind, entry["num_rows"], tuple(entry["row_shape"]),
                           dtype, entry["chunk_size"])
    if chunks.damaged:
        damaged = "; ".join(f"{chunks.file(index)}: {damage}"
                            for index, damage in sorted(chunks.damaged.items()))
        raise ValueError(f"{path}: {kind} has damaged chunks ({damaged}); rerun with the same "
                         "settings to compute them again")
    unfinished = sorted(set(range(chunks.num_chunks)) - chunks.finished)
    if unfinished:
        raise ValueError(f"{path}: {kind} is unfinished, chunks {unfinished} are missing; "
                         "rerun with the same settings to complete it")
    return chunks.read()
