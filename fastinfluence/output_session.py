"""An :class:`~fastinfluence.Influence`'s resumable output (docs/design.md §2, "Resumable
output"): the fingerprint of its settings (computed once), ``s`` saved to and reused from a
directory, and the chunk loop of its queries. Files, manifest and checksums are
:mod:`fastinfluence.sharded_output`; the fingerprints :mod:`fastinfluence.fingerprints`.

Under ``torch.distributed`` every rank runs the same session: each decides from the files every
rank sees, before its first collective, whether to solve and which chunks to compute, and only
rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from fastinfluence.errors import SettingsMismatchError
from fastinfluence.fingerprints import callable_fingerprints, data_fingerprint, model_fingerprint
from fastinfluence.functional import FunctionalModel
from fastinfluence.hessian.solvers import SolveReport
from fastinfluence.labelled_data import LabelledData
from fastinfluence.progress import progress_bar
from fastinfluence.sharded_output import DEFAULT_CHUNK_SIZE, OutputDirectory, ihvp_sha256

Compute = Callable[[torch.Tensor], torch.Tensor]


class OutputSession:
    """The output directories of one ``Influence``, all under one fingerprint of its settings.

    Args:
        fmodel: the model as a function of θ_S (its snapshot is fingerprinted).
        train: the training set.
        val: the validation set (``None`` for output that depends on none: the gradient
            store's).
        options: what changes ``s`` besides model and data (``"auto"`` resolved, so that naming
            the curvature or solver it chose changes nothing); the loss and output selector
            are added by :func:`~fastinfluence.fingerprints.callable_fingerprints`.
        group: the process group whose rank 0 writes.
        progress: show a progress bar over chunks.
    """

    def __init__(self, fmodel: FunctionalModel, train: LabelledData, val: LabelledData | None,
                 options: dict[str, Any], group: Any | None, progress: bool) -> None:
        self.fmodel = fmodel
        self.train = train
        self.val = val
        self.options = options
        self.group = group
        self.progress = progress
        self._settings: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        """The fingerprint of model, training and validation data and options that ``s`` and
        every output depend on (computed once, from the snapshot, before any solve)."""
        if self._settings is None:
            fmodel = self.fmodel
            self._settings = {
                "model": model_fingerprint(fmodel.model, fmodel.tensors(fmodel.theta),
                                           fmodel.model_dtype),
                "train": data_fingerprint(self.train),
                "val": None if self.val is None else data_fingerprint(self.val),
                "options": {**self.options, **callable_fingerprints(fmodel, self.train)},
            }
        return self._settings

    def open(self, out: str | os.PathLike) -> OutputDirectory:
        """The directory ``out`` for these settings (another set's is refused)."""
        return OutputDirectory(out, self.settings(), self.group)

    def saved_ihvp(self, directory: OutputDirectory, out: str | os.PathLike,
                   dim: int) -> tuple[torch.Tensor, SolveReport] | None:
        """``s`` and its solve report read from ``directory``, checked to fit θ_S (``dim``
        entries); ``None`` when none is saved there (or it is damaged: solved again)."""
        saved = directory.load_ihvp()
        if saved is None:
            return None
        array, report = saved
        if array.shape != (dim,):
            raise ValueError(
                f"the s saved in out={str(out)!r} has shape {array.shape}, expected "
                f"({dim},): the file was changed; delete it to solve again"
            )
        fmodel = self.fmodel
        ihvp = torch.from_numpy(array).to(device=fmodel.device, dtype=fmodel.dtype)
        return ihvp, SolveReport(**report)

    def chunked(
        self,
        kind: str,
        out: str | os.PathLike,
        chunk_size: int | None,
        samples: LabelledData,
        description: dict[str, Any],
        row_shape: tuple[int, ...],
        compute: Compute,
        ihvp: torch.Tensor,
        solve: SolveReport,
    ) -> torch.Tensor:
        """Output ``kind``, one row per sample of ``samples``, chunk by chunk through ``out``:
        finished chunks are read back, the others computed by ``compute(row_indices)`` and
        written as they finish (on rank 0 only; every rank runs the same loop). ``s``
        (``ihvp``, solved as ``solve`` reports) is saved there first, or checked to be the one
        saved there."""
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE
        directory = self.open(out)
        sha256 = ihvp_sha256(ihvp)
        saved = directory.manifest["ihvp"]
        if saved is None:
            directory.save_ihvp(ihvp, solve.as_dict())
        elif saved["sha256"] != sha256:
            raise SettingsMismatchError(
                f"out={str(out)!r} holds another s = (H + λI)^(-1)∇L(val) for the same settings "
                "(solved elsewhere, e.g. on another device); build the Influence with "
                "out=<that directory> to reuse the saved s, or use another directory"
            )
        chunks = directory.output(kind, {**description, "ihvp_sha256": sha256},
                                  len(samples), row_shape, ihvp.dtype, chunk_size)
        for index in progress_bar(range(chunks.num_chunks), self.progress, f"{kind} chunks"):
            if index not in chunks.finished:
                chunks.write(index, compute(chunks.rows(index)))
        return chunks.read().to(self.fmodel.device)
