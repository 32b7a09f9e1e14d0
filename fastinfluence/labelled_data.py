"""Adapters that turn the accepted data forms into batches, and the input checks.

Accepted forms (docs/design.md §2): a ``(X, y)`` tuple of tensors, a map-style ``Dataset`` yielding
``(x, y)``, or a ``DataLoader`` over one. An input ``X``/``x`` is one tensor, a tuple (or list) of
tensors, passed to the model as positional arguments (``model(x1, x2)``), or a dict of tensors,
passed as keyword arguments (``model(**x)``, as Hugging Face models take ``input_ids`` and
``attention_mask``); every tensor of an input has the samples on its first dimension.
Influence needs a sized data set that can be read again in a fixed order (``H`` and ``∇L`` are
means over it; scores come back one per sample), so a ``DataLoader`` is re-read over
``loader.dataset`` in index order: its ``shuffle`` and ``drop_last`` are overridden, its batch
size, ``collate_fn`` and worker settings are kept.

Tuples are checked whole when their labels are checked; datasets and loaders are checked
batch by batch as they are read, since reading them is the expensive part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | dict[str, torch.Tensor]
"""A model input: one tensor, positional tensors, or keyword tensors (module docstring)."""
DataLike = tuple[Inputs, torch.Tensor] | Dataset | DataLoader

DEFAULT_BATCH_SIZE = 256

KEPT_LOADER_OPTIONS = ("collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn",
                       "multiprocessing_context", "persistent_workers", "pin_memory_device")
"""The ``DataLoader`` settings a re-read keeps (``prefetch_factor`` too, with workers)."""


CHECK_BLOCK_NUMBERS = 2**22
"""Numbers checked for NaN/Inf at once: a large tensor (a memory-mapped file's, say) is checked
in blocks of rows, never with a mask of its own size."""


def check_features(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if a floating-point tensor holds NaN or Inf."""
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return
    rows = max(1, CHECK_BLOCK_NUMBERS // (x.numel() // len(x))) if x.ndim else 1
    bad = sum(int((~torch.isfinite(block)).sum()) for block in (x.split(rows) if x.ndim else [x]))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or Inf value(s)")


def named_inputs(inputs: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of an input with their names in messages (``""`` for a single tensor,
    ``"[1]"`` for a positional one, ``"['input_ids']"`` for a keyword one); ``TypeError`` naming
    ``name`` for any other structure."""
    if isinstance(inputs, torch.Tensor):
        return [("", inputs)]
    if isinstance(inputs, (tuple, list)):
        named = [(f"[{index}]", value) for index, value in enumerate(inputs)]
    elif isinstance(inputs, dict) and all(isinstance(key, str) for key in inputs):
        named = [(f"[{key!r}]", value) for key, value in inputs.items()]
    else:
        named = []
    if not named or not all(isinstance(value, torch.Tensor) for _, value in named):
        raise TypeError(
            f"{name} must be a tensor, a tuple of tensors (the model's positional arguments) "
            f"or a dict of tensors by name (its keyword arguments), got "
            f"{_structure(inputs)}"
        )
    return named


def _as_dict(inputs: Any) -> Any:
    """A mapping of inputs that is not a dict (Hugging Face's ``BatchEncoding`` is a
    ``UserDict``) as a dict, which ``map_inputs`` takes apart; anything else as it is."""
    return dict(inputs) if isinstance(inputs, Mapping) and not isinstance(inputs, dict) else inputs


def _structure(inputs: Any) -> str:
    if isinstance(inputs, (tuple, list, dict)):
        values = inputs.values() if isinstance(inputs, dict) else inputs
        inner = ", ".join(type(value).__name__ for value in values)
        return f"{type(inputs).__name__} of ({inner})"
    return type(inputs).__name__


def map_inputs(function: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    """``function`` applied to every tensor of an input, keeping its structure (batch slices,
    moves and casts of single and several-tensor inputs alike)."""
    return tree_map(function, inputs)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in any nesting of tuples, lists and dicts (a module's inputs or outputs, an
    operation's arguments), in pytree order."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def first_samples(inputs: Inputs, count: int) -> Inputs:
    """The first ``count`` samples of an input (of each of its tensors)."""
    return map_inputs(lambda tensor: tensor[:count], inputs)


def input_length(inputs: Inputs, name: str) -> int:
    """The number of samples of an input; ``ValueError`` naming ``name`` when a tensor has no
    sample dimension or two tensors hold different numbers of samples."""
    lengths = {}
    for label, tensor in named_inputs(inputs, name):
        if tensor.ndim == 0:
            raise ValueError(f"{name}{label} needs a leading sample dimension")
        lengths[label] = len(tensor)
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name}{label}: {n}" for label, n in lengths.items())
        raise ValueError(f"the tensors of {name} differ in their number of samples ({shown})")
    return next(iter(lengths.values()))


def model_arguments(inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """``(args, kwargs)`` of the model's call on an input: ``(x,)`` for a tensor, the tensors of
    a tuple or list as positional arguments, those of a dict as keyword arguments."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def class_labels(y: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """``y`` as ``int64`` class indices of shape ``[n]``, or ``ValueError`` naming the problem.

    Any integer dtype is accepted (and cast), and so is a ``[n, 1]`` column (squeezed); one-hot
    or other 2-D labels, floats, booleans and labels outside ``[0, num_classes)`` are refused.
    These are the targets of the default cross-entropy loss only (a custom ``loss_fn`` gets its
    targets as given).
    """
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class indices for the default cross-entropy loss, "
            f"got dtype {y.dtype}; pass loss_fn for other targets"
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = (" (one-hot labels? pass y.argmax(dim=1))"
                if y.ndim == 2 and y.shape[1] == num_classes else "")
        raise ValueError(
            f"{name} must be class indices of shape [n] (or [n, 1]) for the default "
            f"cross-entropy loss, got shape {tuple(y.shape)}{hint}; pass loss_fn for other "
            "targets"
        )
    y = y.to(torch.int64)
    if y.numel() == 0:
        return y
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} has labels in [{low}, {high}] but the model outputs {num_classes} classes "
            f"(labels must lie in [0, {num_classes - 1}])"
        )
    return y


class LabelledData:
    """A labelled data set in any accepted form, read as ``(x, y)`` batches on a device.

    Batches always come in the data set's own order, and every sample is read exactly once per
    pass (a count that differs from ``len(dataset)`` raises ``ValueError``).

    Args:
        data: ``(X, y)`` tensors (``X`` may be a tuple or dict of tensors, module docstring),
            a map-style ``Dataset`` of ``(x, y)`` pairs, or a
            ``DataLoader`` whose sampler is sequential or a plain shuffle (re-read in index
            order, keeping its batch size, ``collate_fn`` and workers; ``drop_last`` is
            ignored). Samplers that skip, repeat or weight samples and custom batch samplers
            are refused: pass a ``Subset`` of the data set instead.
        name: what the data is called in error messages (``"train"``, ``"val"``, ...).
        batch_size: batch size for tuples and datasets; a ``DataLoader`` keeps its own.
    """

    def __init__(self, data: Any, name: str, batch_size: int | None = None) -> None:
        self.name = name
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        self.tensors: tuple[Inputs, torch.Tensor] | None = None
        self.dataset: Dataset | None = None
        self.loader_batch_size: int | None = None
        """The batch size of a given ``DataLoader`` (``None``: follow ``batch_size``)."""
        self.loader_options: dict[str, Any] = {}
        self._sequential: DataLoader | None = None
        self.num_classes: int | None = None
        if isinstance(data, (tuple, list)):
            if len(data) != 2 or not isinstance(data[1], torch.Tensor):
                raise TypeError(f"{name} as a tuple must be (X, y), two tensors (X may be a "
                                "tuple or dict of tensors, for a model of several inputs)")
            inputs, targets = _as_dict(data[0]), data[1]
            length = input_length(inputs, f"{name} X")
            if targets.ndim == 0:
                raise ValueError(f"{name} X and y need a leading sample dimension")
            if length != len(targets):
                raise ValueError(
                    f"{name} X and y differ in length: {length} samples vs {len(targets)} "
                    "labels"
                )
            for label, tensor in named_inputs(inputs, f"{name} X"):
                check_features(tensor, f"{name} X{label}")
            check_features(targets, f"{name} y")
            self.tensors = (inputs, targets)
            self.length = length
        elif isinstance(data, DataLoader):
            self.dataset = self._map_style(data.dataset, f"{name} (a DataLoader's dataset)")
            self.loader_batch_size = _loader_batch_size(data, name)
            self.loader_options = {key: getattr(data, key) for key in KEPT_LOADER_OPTIONS}
            if data.num_workers > 0:
                self.loader_options["prefetch_factor"] = data.prefetch_factor
        elif isinstance(data, Dataset):
            self.dataset = self._map_style(data, name)
        else:
            raise TypeError(
                f"{name} must be an (X, y) tuple of tensors, a Dataset or a DataLoader, "
                f"got {type(data).__name__}"
            )
        if self.dataset is not None:
            self.length = len(self.dataset)  # type: ignore[arg-type]
        if self.length == 0:
            raise ValueError(f"{name} is empty: influence needs at least one sample")

    @staticmethod
    def _map_style(dataset: Any, name: str) -> Dataset:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"{name} is an IterableDataset: influence needs a map-style Dataset (with "
                "__len__ and __getitem__) that can be read again in a fixed order"
            )
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"{name} must be a map-style Dataset with __len__ and __getitem__, got "
                f"{type(dataset).__name__}"
            )
        return dataset

    def __len__(self) -> int:
        return self.length

    def check_labels(self, num_classes: int) -> None:
        """Check (and cast) the labels of tuple data now; other forms are checked as read.

        Called only for the default cross-entropy loss, see :func:`class_labels`.
        """
        self.num_classes = num_classes
        if self.tensors is not None:
            inputs, targets = self.tensors
            self.tensors = (inputs, class_labels(targets, num_classes, f"{self.name} y"))

    def batches(
        self, device: torch.device, dtype: torch.dtype
    ) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Yield ``(x, y)`` on ``device`` in the data set's order; floating inputs are cast to
        ``dtype``."""
        if self.tensors is not None:
            inputs, targets = self.tensors
            for start in range(0, self.length, self.batch_size):
                rows = slice(start, start + self.batch_size)
                yield self._prepare(map_inputs(lambda t, rows=rows: t[rows], inputs),
                                    targets[rows], device, dtype)
            return
        read = 0
        for batch in self._loader():
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"{self.name} must yield (x, y) pairs")
            inputs, targets = _as_dict(batch[0]), batch[1]
            # Containers hold the model's several inputs; anything else is one (array-like).
            inputs = (map_inputs(torch.as_tensor, inputs)
                      if isinstance(inputs, (tuple, list, dict)) else torch.as_tensor(inputs))
            targets = torch.as_tensor(targets)
            length = input_length(inputs, f"{self.name} x")
            if length != len(targets):
                raise ValueError(f"{self.name} yielded a batch whose x and y differ in length")
            read += length
            if read > self.length:
                self._count_mismatch(f"more than {self.length}")
            for label, tensor in named_inputs(inputs, f"{self.name} x"):
                check_features(tensor, f"{self.name} x{label}")
            if self.num_classes is not None:
                targets = class_labels(targets, self.num_classes, f"{self.name} y")
            yield self._prepare(inputs, targets, device, dtype)
        if read != self.length:
            self._count_mismatch(str(read))

    def _count_mismatch(self, read: str) -> None:
        raise ValueError(
            f"{self.name} yielded {read} samples but its dataset has length {self.length}: "
            "influence takes means over every sample, so the two must agree"
        )

    def _loader(self) -> DataLoader:
        """A sequential, complete pass over ``dataset`` (DataLoader settings kept), built once
        per batch size so that persistent workers persist across passes."""
        batch_size = self.loader_batch_size or self.batch_size
        if self._sequential is None or self._sequential.batch_size != batch_size:
            self._sequential = DataLoader(self.dataset, batch_size=batch_size, shuffle=False,
                                          drop_last=False, **self.loader_options)
        return self._sequential

    def subset(self, indices: torch.Tensor) -> LabelledData:
        """The samples at ``indices`` (repeats allowed), in the same form of batches."""
        if self.tensors is not None:
            inputs, targets = self.tensors
            part = LabelledData((map_inputs(lambda t: t[indices.to(t.device)], inputs),
                                 targets[indices.to(targets.device)]), self.name,
                                self.batch_size)
        else:
            part = LabelledData(Subset(self.dataset, indices.tolist()), self.name,
                                self.batch_size)
            part.loader_batch_size = self.loader_batch_size
            part.loader_options = dict(self.loader_options)
        part.num_classes = self.num_classes
        return part

    def num_batches(self) -> int:
        """Batches per pass (for progress bars)."""
        batch_size = self.loader_batch_size or self.batch_size
        return -(-self.length // batch_size)

    @staticmethod
    def _prepare(
        inputs: Inputs, targets: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[Inputs, torch.Tensor]:
        return cast_inputs(inputs, device, dtype), targets.to(device=device)


def cast_inputs(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """``inputs`` (each tensor of them) on ``device``, in ``dtype`` when floating point
    (integer inputs such as token ids and attention masks keep their dtype)."""
    return map_inputs(
        lambda tensor: tensor.to(device=device,
                                 dtype=dtype if tensor.is_floating_point() else None),
        inputs)


def _loader_batch_size(loader: DataLoader, name: str) -> int:
    """The batch size of ``loader``, if re-reading its dataset in order reads what it reads."""
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        raise ValueError(
            f"{name}: DataLoader(batch_size=None) turns batching off; influence needs batches "
            "of (x, y) samples (give the DataLoader a batch_size)"
        )
    if type(batch_sampler) is not BatchSampler:
        raise ValueError(
            f"{name}: the DataLoader's custom batch_sampler ({type(batch_sampler).__name__}) "
            "cannot be re-read in the dataset's order; give the DataLoader a batch_size instead "
            "(influence reads loader.dataset in index order)"
        )
    sampler = batch_sampler.sampler
    complete_shuffle = (type(sampler) is RandomSampler and not sampler.replacement
                        and sampler.num_samples == len(loader.dataset))  # type: ignore[arg-type]
    if type(sampler) is not SequentialSampler and not complete_shuffle:
        raise ValueError(
            f"{name}: the DataLoader's sampler ({type(sampler).__name__}) may skip, repeat or "
            "weight samples, and influence reads every sample of loader.dataset once, in index "
            "order; pass a torch.utils.data.Subset of the dataset to use only some samples"
        )
    return batch_sampler.batch_size
