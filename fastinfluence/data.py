"""Adapters that turn the accepted data forms into batches, and the input checks.

Accepted forms (DESIGN.md §2): a ``(X, y)`` tuple of tensors, a ``Dataset`` yielding
``(x, y)``, or a ``DataLoader``. Tuples are checked whole when wrapped; datasets and loaders
are checked batch by batch as they are read, since reading them is the expensive part.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

DataLike = tuple[torch.Tensor, torch.Tensor] | Dataset | DataLoader

DEFAULT_BATCH_SIZE = 256


def check_features(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if a floating-point tensor holds NaN or Inf."""
    if x.is_floating_point() or x.is_complex():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"{name} contains {bad} NaN or Inf value(s)")


def check_class_labels(y: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise ``ValueError`` unless ``y`` holds integer class indices in ``[0, num_classes)``."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class indices for the default cross-entropy loss, "
            f"got dtype {y.dtype}; pass loss_fn for other targets"
        )
    if y.numel() == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} has labels in [{low}, {high}] but the model outputs {num_classes} classes "
            f"(labels must lie in [0, {num_classes - 1}])"
        )


class LabelledData:
    """A labelled data set in any accepted form, read as ``(x, y)`` batches on a device.

    Args:
        data: ``(X, y)`` tensors, a ``Dataset`` of ``(x, y)`` pairs, or a ``DataLoader``.
        name: what the data is called in error messages (``"train"``, ``"val"``, ...).
        batch_size: batch size for tuples and datasets; a ``DataLoader`` keeps its own.
    """

    def __init__(self, data: Any, name: str, batch_size: int | None = None) -> None:
        self.name = name
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loader: DataLoader | None = None
        self.num_classes: int | None = None
        if isinstance(data, (tuple, list)):
            if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
                raise TypeError(f"{name} as a tuple must be (X, y), two tensors")
            inputs, targets = data
            if inputs.ndim == 0 or targets.ndim == 0:
                raise ValueError(f"{name} X and y need a leading sample dimension")
            if len(inputs) != len(targets):
                raise ValueError(
                    f"{name} X and y differ in length: {len(inputs)} samples vs {len(targets)} "
                    "labels"
                )
            check_features(inputs, f"{name} X")
            check_features(targets, f"{name} y")
            self.tensors = (inputs, targets)
            self.length = len(inputs)
        elif isinstance(data, DataLoader):
            self.loader = data
            self.length = len(data.dataset)  # type: ignore[arg-type]
        elif isinstance(data, Dataset):
            self.loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
            self.length = len(data)  # type: ignore[arg-type]
        else:
            raise TypeError(
                f"{name} must be an (X, y) tuple of tensors, a Dataset or a DataLoader, "
                f"got {type(data).__name__}"
            )
        if self.length == 0:
            raise ValueError(f"{name} is empty: influence needs at least one sample")

    def __len__(self) -> int:
        return self.length

    def check_labels(self, num_classes: int) -> None:
        """Check the labels of tuple data now; other forms are checked as they are read."""
        self.num_classes = num_classes
        if self.tensors is not None:
            check_class_labels(self.tensors[1], num_classes, f"{self.name} y")

    def batches(
        self, device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` on ``device``; floating inputs are cast to ``dtype``."""
        if self.tensors is not None:
            inputs, targets = self.tensors
            for start in range(0, self.length, self.batch_size):
                stop = start + self.batch_size
                yield self._prepare(inputs[start:stop], targets[start:stop], device, dtype)
            return
        assert self.loader is not None
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{self.name} must yield (x, y) pairs")
            inputs, targets = (torch.as_tensor(t) for t in batch)
            if len(inputs) != len(targets):
                raise ValueError(f"{self.name} yielded a batch whose x and y differ in length")
            check_features(inputs, f"{self.name} x")
            if self.num_classes is not None:
                check_class_labels(targets, self.num_classes, f"{self.name} y")
            yield self._prepare(inputs, targets, device, dtype)

    def subset(self, indices: torch.Tensor) -> LabelledData:
        """The samples at ``indices`` (repeats allowed), in the same form of batches."""
        if self.tensors is not None:
            inputs, targets = self.tensors
            index = indices.to(inputs.device)
            part = LabelledData((inputs[index], targets[index.to(targets.device)]), self.name,
                                self.batch_size)
        else:
            assert self.loader is not None
            part = LabelledData(Subset(self.loader.dataset, indices.tolist()), self.name,
                                self.batch_size)
        part.num_classes = self.num_classes
        return part

    def num_batches(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        return -(-self.length // self.batch_size)

    @staticmethod
    def _prepare(
        inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else None)
        targets = targets.to(device=device)
        return inputs, targets
