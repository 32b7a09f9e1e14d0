"""The check that each sample's eval-mode output is its own (docs/design.md §2).

Influence treats ``L`` as a mean of per-sample losses and computes it batch by batch, so a
model whose output for one sample depends on the other samples of its batch (BatchNorm with
``track_running_stats=False``, a normalisation over the batch dimension written by hand) gives
results that change with ``batch_size``. Such a model is refused before any expensive work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fastinfluence.functional import FunctionalModel
from fastinfluence.labelled_data import (
    Inputs,
    LabelledData,
    input_length,
    map_inputs,
    named_inputs,
    tensors_in,
)
from fastinfluence.modes import eval_mode

Event = tuple[str, list[torch.Tensor], list[torch.Tensor]]
"""One module call: its name, the tensors of its inputs and of its output."""


def check_sample_independence(
    fmodel: FunctionalModel, example: Inputs, train: LabelledData
) -> None:
    """Refuse a model whose eval-mode output for a sample depends on the rest of its batch.

    The model runs at the snapshot θ on ``example`` as one batch and on each of its samples
    alone, without gradients. Every output tensor with a batch dimension must give each sample
    the same values both ways, to ``ε^(1/3)`` of the tensor's largest magnitude (``ε`` of its
    dtype: 5e-3 in float32, 6e-6 in float64). Kernels chosen by batch size change only
    rounding, far below that; batch statistics change the output by its own order. A sample
    that fails alone (BatchNorm's batch statistics need two) depends on its batch too.

    Args:
        fmodel: the model as a function of θ_S (its snapshot is what is checked).
        example: two or more inputs of one batch (the probe's validation samples).
        train: the first two training samples are used instead when ``example`` holds one.

    Raises:
        ValueError: naming the first module (in the order calls finish) whose output for a
            sample differs alone and in the batch while its input does not.
    """
    if _size(example) < 2:
        if len(train) < 2:
            return  # every batch holds one sample: no two share a batch
        pieces = [x for x, _ in train.subset(torch.arange(2)).batches(fmodel.device,
                                                                      fmodel.dtype)]
        example = _join(pieces)
        if example is None:
            return  # samples of different shapes never share a batch
    with eval_mode(fmodel.model), torch.no_grad():
        batched = fmodel.logits(fmodel.theta, example)
        for index in range(_size(example)):
            try:
                alone = fmodel.logits(fmodel.theta, _sample(example, index))
            except Exception as error:  # any failure on a sample alone is the finding
                _refuse(fmodel, example, index, error)
            if _differs(tensors_in(batched), tensors_in(alone), index):
                _refuse(fmodel, example, index, None)


def _size(example: Inputs) -> int:
    """The number of samples in a batch of inputs."""
    return input_length(example, "example")


def _sample(example: Inputs, index: int) -> Inputs:
    """Sample ``index`` of a batch of inputs, as a batch of one."""
    return map_inputs(lambda tensor: tensor[index:index + 1], example)


def _join(pieces: list[Inputs]) -> Inputs | None:
    """Batches of inputs as one batch (``None`` when their samples differ in shape)."""
    shapes = {tuple((label, tuple(t.shape[1:])) for label, t in named_inputs(piece, ""))
              for piece in pieces}
    if len(shapes) > 1:
        return None
    return tree_map(lambda *tensors: torch.cat(tensors), *pieces)


def _differs(batched: list[torch.Tensor], alone: list[torch.Tensor], index: int) -> bool:
    """Whether sample ``index``'s rows of the ``batched`` tensors differ from the tensors of
    its run ``alone``. Only tensors with a batch dimension are compared: the one dimension
    where the two shapes differ, of size ``n`` batched and 1 alone."""
    if len(batched) != len(alone):
        return True
    for whole, own in zip(batched, alone, strict=True):
        if whole.ndim != own.ndim:
            continue
        differing = [d for d in range(whole.ndim) if whole.shape[d] != own.shape[d]]
        if (len(differing) != 1 or own.shape[differing[0]] != 1
                or whole.shape[differing[0]] <= index):
            continue  # no batch dimension (or another shape): not a per-sample value
        row = whole.narrow(differing[0], index, 1)
        if not row.is_floating_point():
            if not torch.equal(row, own):
                return True
            continue
        scale = float(torch.maximum(row.abs().nan_to_num().amax(),
                                    own.abs().nan_to_num().amax()))
        tolerance = torch.finfo(row.dtype).eps ** (1 / 3) * scale
        if not torch.allclose(row, own, rtol=0, atol=tolerance, equal_nan=True):
            return True
    return False


def _refuse(
    fmodel: FunctionalModel, example: Inputs, index: int, error: Exception | None
) -> NoReturn:
    """Raise the ``ValueError`` naming the module that mixes samples, found by hooks on one
    more batched run and one more run of sample ``index`` alone."""
    model = fmodel.model
    names = {module: name for name, module in model.named_modules()}
    batched = _record(fmodel, example, names)[0]
    alone, running = _record(fmodel, _sample(example, index), names)
    culprit = running[-1] if running else None  # the innermost call that raised
    if culprit is None:
        for (name, inputs, outputs), (alone_name, alone_inputs, alone_outputs) in zip(
                batched, alone, strict=False):
            if name != alone_name:
                break  # the two runs took other paths: nothing further lines up
            if (_differs(outputs, alone_outputs, index)
                    and not _differs(inputs, alone_inputs, index)):
                culprit = name
                break
    if culprit is None:
        where = "the model"
    else:
        module = model.get_submodule(culprit)
        where = (f"module {culprit!r} ({type(module).__name__})" if culprit
                 else f"the model's own forward ({type(module).__name__})")
    what = (f"fails on a sample alone ({type(error).__name__}: {error})" if error is not None
            else "gives a sample another output alone than in a batch")
    raise ValueError(
        f"{where} {what}: in eval mode the model's output for a sample depends on the other "
        "samples of its batch (e.g. BatchNorm with track_running_stats=False normalises by "
        "the batch's statistics), so influence would change with batch_size; give the model "
        "per-sample behaviour in eval mode (running statistics, or a per-sample "
        "normalisation such as LayerNorm or GroupNorm)"
    ) from error


def _record(
    fmodel: FunctionalModel, inputs: Inputs, names: dict[nn.Module, str]
) -> tuple[list[Event], list[str]]:
    """Every module call of a run on ``inputs`` in the order calls finish, and the calls
    still running when the run raised (outermost first; empty when it finished)."""
    events: list[Event] = []
    running: list[str] = []

    def started(name: str) -> Callable[..., None]:
        return lambda *_: running.append(name)

    def finished(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            running.pop()
            events.append((name, tensors_in([args, kwargs]), tensors_in(output)))
        return hook

    hooks = []
    for module, name in names.items():
        hooks.append(module.register_forward_pre_hook(started(name)))
        hooks.append(module.register_forward_hook(finished(name), with_kwargs=True))
    try:
        with eval_mode(fmodel.model), torch.no_grad():
            fmodel.logits(fmodel.theta, inputs)
    except Exception:  # the caller reports the failure; this run finds only where
        return events, running
    finally:
        for hook in hooks:
            hook.remove()
    return events, []
