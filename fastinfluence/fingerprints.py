"""Fingerprints of what resumable output depends on (docs/design.md §2, "Resumable output"):
the model (:func:`model_fingerprint`), a data set (:func:`data_fingerprint`) and the loss and
output selector, by state and behaviour (:func:`callable_fingerprints`). An output directory's
manifest records them (:mod:`fastinfluence.sharded_output`); another set refuses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import types
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastinfluence.labelled_data import LabelledData, named_inputs

if TYPE_CHECKING:
    from fastinfluence.functional import FunctionalModel

FINGERPRINT_SAMPLES = 16
"""Samples hashed at each end of a data set: a cheap check that the data is the same, fixed so
that a change of batch size does not change the fingerprint."""
PROBE_SAMPLES = 8
"""Training samples on whose model outputs the loss and the output selector are probed."""
PROBE_RTOL = {torch.float64: 1e-8, torch.float32: 1e-2}
"""How far (relative to the largest value) probe values may differ and still count as the same
behaviour: rounding on another device or batch size must not refuse a directory, and in
float32 GPUs may compute convolutions in TF32 (about 1e-3). Changes of a callable's state or
code are caught exactly by its state digest instead."""
DESCRIBE_DEPTH = 6
"""How deep :func:`describe_callable` follows references (closures, attributes, containers)."""


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
    samples (inputs and labels, read as the scorers read them), read in one batch so that
    neither ``batch_size`` nor a loader's batch size changes it."""
    n = len(data)
    ends = sorted({*range(min(FINGERPRINT_SAMPLES, n)),
                   *range(max(0, n - FINGERPRINT_SAMPLES), n)})
    part = data.subset(torch.tensor(ends, dtype=torch.int64))
    part.batch_size, part.loader_batch_size = len(ends), None
    tensors = []
    for inputs, targets in part.batches(torch.device("cpu"), torch.float64):
        tensors += [*((f"x{label}", tensor) for label, tensor in named_inputs(inputs, "x")),
                    ("y", targets)]
    return {"num_samples": n, "sha256": tensor_digest(tensors)}


def _code(code: types.CodeType) -> dict[str, Any]:
    """A function's code without its name, file and line numbers: two lambdas written alike
    describe alike wherever they are defined."""

    def constant(value: Any) -> Any:
        if isinstance(value, types.CodeType):
            return _code(value)
        if isinstance(value, (tuple, frozenset)):
            items = [constant(item) for item in value]
            # A frozenset's order depends on string hashing, which differs between processes.
            return sorted(items, key=json.dumps) if isinstance(value, frozenset) else items
        return repr(value)

    return {"bytecode": code.co_code.hex(), "constants": [constant(c) for c in code.co_consts],
            "names": list(code.co_names)}


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` and the code nested in it look up."""
    names = set(code.co_names)
    for value in code.co_consts:
        if isinstance(value, types.CodeType):
            names |= _global_names(value)
    return names


def _is_data(value: Any) -> bool:
    """Whether ``value`` is a plain value or tensor (not a function, class or module)."""
    if isinstance(value, (bool, int, float, complex, str, bytes, type(None), torch.Tensor,
                          torch.dtype, torch.device, np.ndarray, np.generic)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_data(item) for item in value)
    if isinstance(value, dict):
        return all(_is_data(item) for item in value.values())
    return False


def describe_callable(thing: Any, depth: int = 0) -> Any:
    """What defines ``thing``'s behaviour besides its outputs, as JSON: plain values as they are
    (or their ``repr``), tensors and numpy arrays by a SHA-256 of their bytes; a
    ``functools.partial`` by its function and arguments; a method by its function and object; a
    Python function by its code (bytecode, constants, names looked up — not its name, file or
    line), defaults, closure and the plain-value globals it reads; an ``nn.Module`` by its
    class, public attributes (such as ``label_smoothing``, ``ignore_index``, ``reduction``),
    own parameters and buffers (such as ``CrossEntropyLoss``'s ``weight``) and submodules;
    another object by its class and attributes. Classes and modules are described by name (the
    functions, classes and modules a function reads as globals by the names in its code);
    references deeper than :data:`DESCRIBE_DEPTH` by their class."""
    if isinstance(thing, (bool, int, float, str, type(None))):
        return thing
    if isinstance(thing, (complex, bytes, np.generic, torch.dtype, torch.device)):
        return repr(thing)
    if isinstance(thing, torch.Tensor):
        return {"tensor": tensor_digest([("", thing)])}
    if isinstance(thing, np.ndarray) and thing.dtype != object:
        array = np.ascontiguousarray(thing)
        digest = hashlib.sha256(f"{array.dtype}|{array.shape}|".encode() + array.tobytes())
        return {"array": digest.hexdigest()}
    if isinstance(thing, types.ModuleType):
        return {"module": thing.__name__}
    if isinstance(thing, type) or depth >= DESCRIBE_DEPTH:
        return {"name": qualified_name(thing)}
    inner = functools.partial(describe_callable, depth=depth + 1)
    if isinstance(thing, (tuple, list, np.ndarray)):  # an ndarray of objects here
        return [inner(item) for item in thing]
    if isinstance(thing, dict):
        return {str(key): inner(value) for key, value in thing.items()}
    if isinstance(thing, functools.partial):
        return {"partial": inner(thing.func), "args": inner(thing.args),
                "keywords": inner(thing.keywords)}
    if isinstance(thing, types.MethodType):
        return {"method": inner(thing.__func__), "self": inner(thing.__self__)}
    if isinstance(thing, types.FunctionType):
        closure = []
        for cell in thing.__closure__ or ():
            try:
                closure.append(inner(cell.cell_contents))
            except ValueError:  # a cell not yet assigned
                closure.append("<empty>")
        found = {name: thing.__globals__[name] for name in sorted(_global_names(thing.__code__))
                 if name in thing.__globals__}
        return {"code": _code(thing.__code__), "defaults": inner(thing.__defaults__),
                "kwdefaults": inner(thing.__kwdefaults__), "closure": closure,
                "globals": {name: inner(value) for name, value in found.items()
                            if _is_data(value)}}
    if isinstance(thing, torch.nn.Module):
        own = [*thing.named_parameters(recurse=False), *thing.named_buffers(recurse=False)]
        return {"class": qualified_name(thing), "tensors": tensor_digest(sorted(own)),
                "attributes": {key: inner(value) for key, value in sorted(vars(thing).items())
                               if not key.startswith("_")},
                "children": {name: inner(child) for name, child in thing.named_children()}}
    if hasattr(thing, "__dict__"):
        return {"class": qualified_name(thing), "attributes": inner(vars(thing))}
    return {"name": qualified_name(thing)}


def _row_numbers(values: torch.Tensor) -> list[float]:
    """Each row of ``values`` as one number: itself, or its projection on a seeded random
    direction (the same for every call with rows of that size)."""
    rows = values.detach().to("cpu", torch.float64).reshape(len(values), -1)
    if rows.shape[1] > 1:
        generator = torch.Generator().manual_seed(0)
        rows = rows @ torch.randn(rows.shape[1], 1, generator=generator, dtype=torch.float64)
    return rows[:, 0].tolist()


def callable_fingerprints(fmodel: FunctionalModel, train: LabelledData) -> dict[str, Any]:
    """``{"loss_fn": ..., "output": ...}``: each callable's state (a SHA-256 of
    :func:`describe_callable`) and behaviour on a probe, the model's outputs for the first
    :data:`PROBE_SAMPLES` training samples with their labels — data every loss the run uses
    accepts. The output selector's behaviour: the shape and dtype of what it picks and one
    number per sample; the loss's: its values and (when it reads a floating tensor) its
    gradient with respect to that tensor, one number per sample. Probe values are compared
    within :data:`PROBE_RTOL` of the compute dtype, so rounding does not refuse a directory;
    a callable with other state or code never matches. The default loss is described as
    :func:`~fastinfluence.functional.cross_entropy_per_sample`."""
    part = train.subset(torch.arange(min(PROBE_SAMPLES, len(train))))
    rtol = PROBE_RTOL.get(fmodel.dtype, PROBE_RTOL[torch.float32])
    # One number per sample and batch by batch: an output may be large (a language model's).
    numbers: dict[str, list[float]] = {"output": [], "loss": [], "gradient": []}
    picked_kind: dict[str, Any] = {}
    for inputs, targets in part.batches(fmodel.device, fmodel.dtype):
        with torch.no_grad():
            picked = fmodel.logits(fmodel.theta, inputs)
        if isinstance(picked, torch.Tensor) and picked.is_floating_point():
            picked_kind = {"shape": list(picked.shape[1:]), "dtype": str(picked.dtype)}
            with torch.enable_grad():
                leaf = picked.detach().requires_grad_(True)
                losses = fmodel.per_sample(leaf, targets)
                (gradient,) = torch.autograd.grad(losses.sum(), leaf, allow_unused=True)
            numbers["output"] += _row_numbers(picked)
            numbers["gradient"] += _row_numbers(torch.zeros_like(leaf) if gradient is None
                                                else gradient)
        else:  # a structure the loss reads as it is: its values alone
            picked_kind = {"type": qualified_name(picked)}
            with torch.no_grad():
                losses = fmodel.per_sample(picked, targets)
        numbers["loss"] += _row_numbers(losses)

    def approximately(values: list[float]) -> dict[str, Any]:
        return {"approximately": values, "rtol": rtol}

    output_probe = dict(picked_kind)
    loss_probe = {"values": approximately(numbers["loss"])}
    if numbers["output"]:
        output_probe["values"] = approximately(numbers["output"])
        loss_probe["gradient"] = approximately(numbers["gradient"])

    def state(thing: Any) -> str:
        text = json.dumps(describe_callable(thing), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    return {"loss_fn": {"state": state(fmodel.loss_fn), "probe": loss_probe},
            "output": {"state": state(fmodel.output), "probe": output_probe}}
