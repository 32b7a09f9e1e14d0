"""``python -m fastinfluence score``: influence of a saved model over saved data, no Python.

The model comes from ``--model pkg.module:factory`` (a callable returning an ``nn.Module``,
called with ``--model-kwargs``) and ``--checkpoint`` (a ``state_dict``, or a dict holding one
under ``"state_dict"`` or ``"model"``, read with ``weights_only=True``). Data is a ``.pt``
file (a tensor, an ``(X, y)`` pair or a dict with ``x``/``y``), a ``.npy`` array with its labels
in ``--train-labels``/``--val-labels`` (memory-mapped, not read up front: an array larger than
memory is read batch by batch), or an image folder (one subfolder per class, sorted
names → labels 0, 1, ...). ``--loss`` and ``--output`` name, in the same ``module:callable``
form, the per-sample loss ``loss(output, y) -> [batch]`` and the selector of the tensor it reads
from the model's output (defaults: cross-entropy on the output itself). The result goes to
``--out`` as resumable chunks (:mod:`fastinfluence.sharded_output`); a rerun with the same
settings finishes what is missing.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) the process group is initialised (gloo on
CPU, NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``) before the ``Influence`` is built and
destroyed at the end; only rank 0 writes and prints, warnings included (every rank runs the
same solves, so the others would repeat them).

Every input error (:class:`CommandError`) is found before the influence work starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fastinfluence._optional import require
from fastinfluence.params import select_parameters
from fastinfluence.sharded_output import DEFAULT_CHUNK_SIZE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WHAT = ("scores", "self-influence")


class CommandError(ValueError):
    """An input of ``score`` that cannot be used; the message names the option."""


@dataclass
class ScoreConfig:
    """The options of ``python -m fastinfluence score`` (see ``--help``)."""

    model: str
    checkpoint: Path
    train: Path
    val: Path
    out: Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    train_labels: Path | None = None
    val_labels: Path | None = None
    what: str = "scores"
    params: str = "last"
    damping: float = 0.01
    hessian: str = "auto"
    solver: str = "auto"
    batch_size: int | None = None
    chunk_size: int | None = None
    device: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    image_mode: str = "RGB"
    image_size: int | None = None
    progress: bool = True
    loss: str | None = None
    output: str | None = None


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` of ``--option``; the value read as JSON (numbers, booleans), else text."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"must be key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def json_object(text: str) -> dict[str, Any]:
    """The JSON object of ``--model-kwargs``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def import_callable(spec: str, option: str) -> Callable[..., Any]:
    """The callable named by ``spec`` (``pkg.module:callable``, dotted attributes allowed), or a
    :class:`CommandError` naming ``option``."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise CommandError(f"{option} must be pkg.module:callable, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise CommandError(f"{option}: cannot import module {module_name!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise CommandError(f"{option}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise CommandError(f"{option}: {spec} is not callable")
    return target


def build_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call the factory named by ``spec`` (``pkg.module:callable``) with ``kwargs``."""
    factory = import_callable(spec, "--model")
    try:
        model = factory(**kwargs)
    except TypeError as error:  # the keywords do not fit the factory's signature
        raise CommandError(f"--model-kwargs: {spec}(**{kwargs!r}) failed: {error}") from error
    if not isinstance(model, nn.Module):
        raise CommandError(
            f"--model: {spec}(**model_kwargs) returned {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model


def _existing(path: Path, option: str) -> Path:
    if not path.exists():
        raise CommandError(f"{option}: no such file or directory: {path}")
    return path


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load the state dict at ``path`` into ``model``, or raise naming every missing and
    unexpected key and every shape mismatch."""
    _existing(path, "--checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise CommandError(f"--checkpoint: cannot read {path} as a torch state dict "
                           f"(weights_only=True): {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CommandError(f"--checkpoint: {path} holds {type(state).__name__}, not a state "
                           "dict (or a dict with one under 'state_dict' or 'model')")
    expected = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(
            k.startswith("module.") for k in expected):
        # Saved from a DistributedDataParallel or DataParallel wrapper.
        state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: {tuple(state[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in the "
        "model" for k in sorted(set(expected) & set(state))
        if isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise CommandError(f"--checkpoint {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


class ImageFolder(Dataset):
    """Images in class subfolders of ``root`` (sorted names → labels 0, 1, ...), read with
    Pillow as ``[C, H, W]`` float32 in ``[0, 1]``.

    Args:
        root: the folder.
        mode: Pillow mode the images are converted to (``"RGB"``, ``"L"``, ...).
        size: resize every image to ``size × size`` (``None``: keep sizes; then all must agree).
        classes: the class names in label order (default: ``root``'s subfolders, sorted); the
            validation folder takes the training folder's, so that a class missing from it
            does not shift the labels of the others.
        option: the command-line option the folder came from, for error messages.
    """

    def __init__(self, root: Path, mode: str = "RGB", size: int | None = None,
                 classes: list[str] | None = None, option: str = "--train") -> None:
        self.image = require("PIL.Image", "Pillow", "datasets", "reading an image folder")
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.classes = found if classes is None else classes
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise CommandError(f"{option}: image folder {root} has classes {unknown} that the "
                               f"training folder lacks (its classes: {self.classes})")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise CommandError(f"{option}: image folder {root} holds no images "
                               f"({', '.join(IMAGE_SUFFIXES)}) in class subfolders")
        self.mode = mode
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with self.image.open(path) as image:
            image = image.convert(self.mode)
            if self.size is not None:
                image = image.resize((self.size, self.size))
            array = np.asarray(image, dtype=np.float32) / 255.0
        pixels = torch.from_numpy(array)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        return pixels.contiguous(), label


def _load_tensor(path: Path, option: str) -> Any:
    _existing(path, option)
    if path.suffix == ".npy":
        try:
            # Copy-on-write mapping: writable for torch, never written, read as batches are.
            return torch.from_numpy(np.load(path, mmap_mode="c", allow_pickle=False))
        except ValueError as error:
            raise CommandError(f"{option}: cannot read {path} as a numpy array: {error}") from error
    if path.suffix == ".pt":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for unreadable or unsafe files
            raise CommandError(f"{option}: cannot read {path} with torch.load "
                               f"(weights_only=True): {error}") from error
    raise CommandError(f"{option}: {path} is neither a .pt nor a .npy file nor a folder")


def _pair(value: Any, path: Path, option: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(X, y)`` from a loaded tuple/list or dict, ``None`` for a lone tensor."""
    if isinstance(value, dict):
        inputs = next((value[k] for k in ("x", "X", "inputs") if k in value), None)
        targets = next((value[k] for k in ("y", "labels", "targets") if k in value), None)
        value = (inputs, targets)
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(t, torch.Tensor) for t in value):
            raise CommandError(f"{option}: {path} must hold X and y tensors, as (X, y) or "
                               "{'x': X, 'y': y}")
        return value[0], value[1]
    if not isinstance(value, torch.Tensor):
        raise CommandError(f"{option}: {path} holds {type(value).__name__}, not tensors")
    return None


def load_data(path: Path, labels: Path | None, option: str, mode: str,
              size: int | None, classes: list[str] | None = None) -> Any:
    """Data for :class:`~fastinfluence.Influence` from a file or image folder (see the
    module docstring; ``classes`` as for :class:`ImageFolder`)."""
    _existing(path, option)
    if path.is_dir():
        if labels is not None:
            raise CommandError(f"{option}-labels: an image folder's labels are its subfolders")
        return ImageFolder(path, mode, size, classes, option)
    inputs = _load_tensor(path, option)
    pair = _pair(inputs, path, option)
    if pair is not None:
        if labels is not None:
            raise CommandError(f"{option}-labels: {path} already holds labels")
        return pair
    if labels is None:
        raise CommandError(f"{option}: {path} holds only inputs; give the labels with "
                           f"{option}-labels (a .pt or .npy file)")
    targets = _load_tensor(labels, f"{option}-labels")
    if not isinstance(targets, torch.Tensor):
        raise CommandError(f"{option}-labels: {labels} must hold one tensor of labels")
    return inputs, targets


CALL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError)
"""What a model, output selector or loss raises on inputs it cannot take."""


def check_model_takes(model: nn.Module, data: Any, option: str, device: torch.device,
                      output: Callable[[Any], Any] | None = None,
                      loss: Callable[[Any, torch.Tensor], Any] | None = None) -> None:
    """Run ``model`` on two samples of ``data``, then ``output`` and ``loss`` on its output
    and their labels; raise naming the data, ``--output`` or ``--loss`` when one fails or the
    loss does not hold one value per sample."""
    if isinstance(data, tuple):
        inputs, labels = data[0][:2], data[1][:2]
    else:
        try:
            samples = [data[i] for i in range(min(2, len(data)))]
        except (OSError, ValueError) as error:  # Pillow: an unreadable file, a bad mode
            raise CommandError(f"{option}: cannot read its first samples: {error}") from error
        inputs = torch.stack([torch.as_tensor(sample[0]) for sample in samples])
        labels = torch.as_tensor([sample[1] for sample in samples])
    first = next(model.parameters())
    if inputs.is_floating_point():
        inputs = inputs.to(first.dtype)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            try:
                result = model(inputs.to(device))
            except CALL_ERRORS as error:
                raise CommandError(
                    f"{option}: the model cannot take these inputs (two samples of shape "
                    f"{tuple(inputs.shape)}, dtype {inputs.dtype}): {error}") from error
            if output is not None:
                try:
                    result = output(result)
                except CALL_ERRORS as error:
                    raise CommandError(f"--output: cannot select from the model's output on "
                                       f"{option}: {error}") from error
            if loss is not None:
                try:
                    values = loss(result, labels.to(device))
                except CALL_ERRORS as error:
                    raise CommandError(f"--loss: fails on two samples of {option}: {error}"
                                       ) from error
                if not isinstance(values, torch.Tensor) or values.shape != (len(labels),):
                    shape = (tuple(values.shape) if isinstance(values, torch.Tensor)
                             else type(values).__name__)
                    raise CommandError(f"--loss must return one loss per sample, shape "
                                       f"({len(labels)},) on two samples of {option}; got "
                                       f"{shape} (use reduction='none')")
        finally:
            model.train(was_training)


def _params(text: str) -> str | list[str]:
    return text if text in ("last", "all") else [name for name in text.split(",") if name]


def _check_device(device: str) -> None:
    """``--device`` must name a device of this machine."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CommandError(f"--device: {error}") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s)")


def _distributed_device(requested: str | None) -> tuple[bool, str | None]:
    """Initialise ``torch.distributed`` when launched by torchrun; the device of this rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, requested
    distributed = torch.distributed
    if distributed.is_initialized():
        return False, requested
    cuda = (requested or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    device = requested
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(device))
    distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return True, device


def run_score(config: ScoreConfig) -> dict[str, Any]:
    """Check every input, then score and write to ``config.out``; returns a summary (what,
    samples, whether ``s`` was reused, the report's path/solver/hessian, the process group
    when distributed)."""
    from fastinfluence.errors import SettingsMismatchError
    from fastinfluence.hessian.solvers import check_options
    from fastinfluence.scoring import Influence, _check_arguments, _check_chunking
    from fastinfluence.sharded_output import is_writer

    if config.what not in WHAT:
        raise CommandError(f"--what must be one of {WHAT}, got {config.what!r}")
    for name, value in config.options.items():
        try:
            check_options({name: value}, config.solver)
        except (TypeError, ValueError) as error:
            raise CommandError(f"--option {name}={value}: {error}") from error
    if config.device is not None:
        _check_device(config.device)
    if config.image_size is not None and config.image_size < 1:
        raise CommandError(f"--image-size must be a positive integer, got {config.image_size}")
    loss = None if config.loss is None else import_callable(config.loss, "--loss")
    output = None if config.output is None else import_callable(config.output, "--output")
    model = build_model(config.model, config.model_kwargs)
    try:
        _check_arguments(model, config.solver, config.hessian, config.damping,
                         config.batch_size, config.options)
        _check_chunking(config.out, config.chunk_size)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from error
    params = _params(config.params)
    if isinstance(params, list):  # names resolve without running the model
        try:
            select_parameters(model, params)
        except (TypeError, ValueError) as error:
            raise CommandError(f"--params: {str(error).removeprefix('params: ')}") from error
    load_checkpoint(model, config.checkpoint)
    train = load_data(config.train, config.train_labels, "--train", config.image_mode,
                      config.image_size)
    val = load_data(config.val, config.val_labels, "--val", config.image_mode,
                    config.image_size, getattr(train, "classes", None))
    started, device = _distributed_device(config.device)
    try:
        compute_device = torch.device(device) if device else next(model.parameters()).device
        model.to(compute_device)
        check_model_takes(model, train, "--train", compute_device, output, loss)
        check_model_takes(model, val, "--val", compute_device, output, loss)
        with warnings.catch_warnings():
            if not is_writer():
                warnings.simplefilter("ignore")
            try:
                influence = Influence(
                    model, train, val, loss_fn=loss, params=params,
                    solver=config.solver, damping=config.damping, hessian=config.hessian,
                    batch_size=config.batch_size, device=compute_device,
                    progress=config.progress and is_writer(), output=output, out=config.out,
                    **config.options,
                )
                query = (influence.scores if config.what == "scores"
                         else influence.self_influence)
                result = query(out=config.out, chunk_size=config.chunk_size)
            except SettingsMismatchError as error:
                raise CommandError(f"--out: {error}") from error
        report = influence.report
        distributed = torch.distributed
        if started:  # no rank tears the group down while a peer still talks to it
            distributed.barrier()
        return {
            "distributed": (f"{distributed.get_backend()}, {distributed.get_world_size()} "
                            "rank(s)") if distributed.is_initialized() else None,
            "what": config.what, "samples": len(result), "out": str(config.out),
            "reused_ihvp": report.reused_ihvp, "path": report.path, "solver": report.solver,
            "hessian": report.hessian, "writer": is_writer(),
        }
    finally:
        if started:
            torch.distributed.destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``score`` on ``parser``."""
    from fastinfluence.hessian.solvers import SOLVERS

    parser.add_argument("--model", required=True,
                        help="pkg.module:callable returning the torch.nn.Module")
    parser.add_argument("--model-kwargs", type=json_object, default={},
                        help="JSON object of keyword arguments for the model callable")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="state_dict file (or a dict with 'state_dict' or 'model')")
    for name in ("train", "val"):
        parser.add_argument(f"--{name}", type=Path, required=True,
                            help=f"{name} data: X.pt/X.npy, a .pt of (X, y), or an image folder")
        parser.add_argument(f"--{name}-labels", type=Path, default=None,
                            help=f"labels of --{name} when it holds only X (.pt or .npy)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (resumable: a rerun finishes what is missing)")
    parser.add_argument("--what", choices=WHAT, default="scores", help="what to compute")
    parser.add_argument("--params", default="last",
                        help="last, all, or comma-separated module names")
    parser.add_argument("--damping", type=float, default=0.01, help="λ in H + λI")
    parser.add_argument("--hessian", default="auto", help="auto, exact, gauss-newton, ...")
    parser.add_argument("--solver", default="auto", help=", ".join(SOLVERS))
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="samples per output chunk file")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, ...; None: where the model is built (cuda:LOCAL_RANK "
                        "under torchrun when CUDA is available)")
    parser.add_argument("--loss", default=None,
                        help="pkg.module:callable, the per-sample loss loss(output, y) -> "
                        "[batch]; default: cross-entropy on the logits")
    parser.add_argument("--output", default=None,
                        help="pkg.module:callable picking the tensor the loss reads from the "
                        "model's output (e.g. of a dict); default: the output itself")
    parser.add_argument("--option", type=parse_option, action="append", default=[],
                        metavar="KEY=VALUE", help="solver option, e.g. tol=1e-8 (repeatable)")
    parser.add_argument("--image-mode", default="RGB",
                        help="Pillow mode image folders are read in (RGB, L, ...)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the images of a folder to this square side (needed "
                        "when their sizes differ)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show progress bars")


def config_from(namespace: argparse.Namespace) -> ScoreConfig:
    """A :class:`ScoreConfig` from parsed arguments."""
    names: Sequence[str] = [f for f in ScoreConfig.__dataclass_fields__ if f != "options"]
    values = {name: getattr(namespace, name) for name in names}
    return ScoreConfig(**values, options=dict(namespace.option))
