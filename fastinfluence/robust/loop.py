"""The training loop shared by every robust trainer, with the hooks the methods override."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastinfluence.robust.config import TrainConfig

Split = tuple[torch.Tensor, torch.Tensor]
"""A labelled split: images ``[n, C, H, W]`` (or 1-D signals ``[n, C, L]``, such as spectra)
and integer labels ``[n]``."""

TestSets = Split | Mapping[str, Split]
"""One test split, or several by name (e.g. ``{"rho=0": ..., "rho=0.5": ...}``): every one is
evaluated after every epoch; the first is *the* test set of the scalar accuracies."""


@dataclass
class EpochRecord:
    """One epoch of a run: mean training objective, then eval-mode accuracies after it.

    Attributes:
        epoch: 1-based epoch number.
        train_loss: mean over the epoch's batches of the loss that was minimised.
        val_accuracy: accuracy on the validation set after the epoch.
        test_accuracies: accuracy on each test set after the epoch, by name (a single test
            split is named ``"test"``).
        seconds: wall time of the epoch, evaluation and method hooks included.
    """

    epoch: int
    train_loss: float
    val_accuracy: float
    test_accuracies: dict[str, float]
    seconds: float

    @property
    def test_accuracy(self) -> float:
        """Accuracy on the first test set."""
        return next(iter(self.test_accuracies.values()))


@dataclass
class TrainResult:
    """What a run reports (docs/design.md §5: never select on the test set).

    Attributes:
        history: one :class:`EpochRecord` per epoch.
        best_epoch: the first epoch with the highest validation accuracy (1-based).
        best_val_accuracy: that validation accuracy.
        seconds: wall time of the whole run.
        extras: method-specific results (influence scores, weights, perturbed indices...).
    """

    history: list[EpochRecord]
    best_epoch: int
    best_val_accuracy: float
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def final_test_accuracies(self) -> dict[str, float]:
        """Accuracy on each test set after the last epoch."""
        return self.history[-1].test_accuracies

    @property
    def test_accuracies_at_best_val(self) -> dict[str, float]:
        """Accuracy on each test set after ``best_epoch``."""
        return self.history[self.best_epoch - 1].test_accuracies

    @property
    def final_test_accuracy(self) -> float:
        """Accuracy on the (first) test set after the last epoch."""
        return self.history[-1].test_accuracy

    @property
    def test_accuracy_at_best_val(self) -> float:
        """Accuracy on the (first) test set after ``best_epoch``."""
        return self.history[self.best_epoch - 1].test_accuracy


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (``[n, C, H, W]``) mirrored left-right with probability 1/2 (the
    last axis is reversed, so a 1-D ``[n, C, L]`` signal would be reversed in time: turn
    ``flip`` off for signals, such as spectra, that have no mirror symmetry)."""
    mask = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(mask.to(x.device).view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


def split_batches(items: torch.Tensor, batch_size: int,
                  join_single: bool = True) -> list[torch.Tensor]:
    """``items`` (indices or images) split along the first axis into batches of
    ``batch_size``, except that a last batch of a single item is joined to the one before it
    (which then holds ``batch_size + 1``) when ``join_single`` (otherwise it stays a batch
    of one).

    A batch of one cannot pass train-mode BatchNorm where a layer's map is 1×1 (one value per
    channel: PyTorch raises, e.g. ResNet-18's last stage at 32²), and elsewhere its batch
    statistics are one image's. The item is joined rather than dropped so that every
    training image still takes part in every epoch; the batch order and all other batches
    are unchanged.
    """
    batches = list(items.split(batch_size))
    if join_single and len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int,
                          device: torch.device) -> None:
    """Set every BatchNorm layer's running mean and variance to the average of its batch
    statistics over ``images`` (in batches of ``batch_size`` as :func:`split_batches` makes
    them, forward passes in train mode),
    as if the momentum were ``1/k`` at the ``k``-th batch. The model's weights, momenta and
    ``training`` flag are unchanged."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    norms = [m for m in model.modules() if isinstance(m, kinds) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    try:
        for part in split_batches(images, batch_size):
            model(part.to(device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)


def check_split(split: Split, name: str) -> Split:
    """``split`` as ``(float images [n, C, H, W] or signals [n, C, L], int64 labels [n])``, or
    a ``ValueError``."""
    if not (isinstance(split, (tuple, list)) and len(split) == 2):
        raise ValueError(f"{name} must be an (images, labels) pair of tensors")
    x, y = split
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ValueError(f"{name} must be an (images, labels) pair of tensors")
    if x.ndim not in (3, 4) or not x.is_floating_point():
        raise ValueError(
            f"{name} images must be a float tensor [n, C, H, W] (or [n, C, L]), got {x.shape}"
        )
    if y.ndim != 1 or y.is_floating_point() or len(y) != len(x) or len(x) == 0:
        raise ValueError(
            f"{name} labels must be integer [n] matching {len(x)} non-zero images, "
            f"got {y.dtype} {tuple(y.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} images contain NaN or Inf")
    return x, y.long()


def check_test_sets(test: TestSets) -> dict[str, Split]:
    """``test`` as a non-empty ``{name: checked split}`` (a single split is named ``"test"``)."""
    if not isinstance(test, Mapping):
        return {"test": check_split(test, "test")}
    if not test:
        raise ValueError("test must be a split or a non-empty mapping of name to split")
    return {str(name): check_split(split, f"test[{name!r}]") for name, split in test.items()}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``config`` names (Adam or SGD) over all of ``model``'s parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


class Trainer:
    """Base trainer: Adam or SGD, random flips, per-epoch evaluation, history and checkpoints.

    One epoch is ``before_epoch(e)``, then for every mini-batch ``B`` (indices into the
    training set, shuffled by the trainer's generator; a last batch of one joins the one
    before unless ``config.join_single_batch`` is off, see :func:`split_batches`) an
    optimiser step on ``batch_loss(x_B, y_B, B)``
    where ``x_B`` is flipped at random (when ``config.flip``), then ``after_epoch(e)``, then
    evaluation. Subclasses override the hooks;
    the base class minimises plain cross-entropy ``(1/|B|) Σ_{i∈B} l(z_i, θ)``.

    Args:
        model: the classifier (trained in place; left in eval mode afterwards).
        config: the method's settings.
        generator: the CPU random stream of the batch order, the flips and the method's own
            draws (``self.generator``), advanced in place. ``None``: a new one seeded with
            ``config.seed``. Pass another trainer's to continue its stream (N2V's denoiser
            draws from the stream its classifier then trains on).
    """

    method = "naive"
    config_type: type[TrainConfig] = TrainConfig

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *,
                 generator: torch.Generator | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = self.config_type() if config is None else config
        if not isinstance(config, self.config_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_type.__name__}, "
                f"got {type(config).__name__}"
            )
        self.model = model
        self.config = config
        self.device = (
            torch.device(config.device) if config.device is not None
            else next(model.parameters()).device
        )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.generator = (torch.Generator().manual_seed(config.seed) if generator is None
                          else generator)
        self.optimizer = make_optimizer(model, config)
        self.train_data: Split | None = None
        self.val_data: Split | None = None
        self._fitted = False

    # -- hooks ----------------------------------------------------------------------------

    def before_epoch(self, epoch: int) -> None:
        """Called before epoch ``epoch`` (0-based) trains; ``self.train_data`` may be replaced."""

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The scalar loss minimised on one batch (model in train mode, ``x`` on device)."""
        return F.cross_entropy(self.model(x), y)

    def after_epoch(self, epoch: int) -> None:
        """Called after epoch ``epoch`` (0-based) has trained (and BatchNorm was recalibrated),
        before its evaluation."""

    # -- the loop -------------------------------------------------------------------------

    def fit(self, train: Split, val: Split, test: TestSets) -> TrainResult:
        """Train for ``config.epochs`` epochs and report per-epoch validation/test accuracy.

        Args:
            train: training images and labels (the images the method may reweight or perturb).
            val: the (clean) validation set: model selection and influence target.
            test: the test set, or several by name (:data:`TestSets`), only ever reported.

        A trainer fits once (its optimiser and method state belong to that run); make a new
        one for another run.
        """
        if self._fitted:
            raise RuntimeError(f"this {type(self).__name__} has already been fitted")
        self._fitted = True
        start = time.perf_counter()
        self.train_data = check_split(train, "train")
        self.val_data = check_split(val, "val")
        tests = check_test_sets(test)
        config = self.config
        self.model.to(self.device)
        history: list[EpochRecord] = []
        bar = tqdm(range(config.epochs), desc=self.method, unit="epoch", leave=False,
                   disable=not config.progress)
        for epoch in bar:
            epoch_start = time.perf_counter()
            self.before_epoch(epoch)
            loss = self._train_epoch()
            if config.recalibrate_bn:
                assert self.train_data is not None
                recalibrate_batchnorm(self.model, self.train_data[0], config.eval_batch_size,
                                      self.device)
            self.after_epoch(epoch)
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=loss,
                val_accuracy=self.accuracy(self.val_data),
                test_accuracies={name: self.accuracy(split) for name, split in tests.items()},
                seconds=time.perf_counter() - epoch_start,
            )
            history.append(record)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{record.val_accuracy:.3f}")
            if config.checkpoint is not None:
                self._save(Path(config.checkpoint), epoch + 1, history)
        self.model.eval()
        best = max(history, key=lambda r: r.val_accuracy)  # first of equal maxima
        return TrainResult(
            history=history,
            best_epoch=best.epoch,
            best_val_accuracy=best.val_accuracy,
            seconds=time.perf_counter() - start,
            extras=self.extras(),
        )

    def extras(self) -> dict[str, Any]:
        """Method-specific results added to :attr:`TrainResult.extras`."""
        return {}

    def fit_unlabelled(self, images: torch.Tensor) -> list[float]:
        """Train a model that is not a classifier (a denoiser, a language model) on ``images``
        alone for ``config.epochs`` epochs: the batches, flips and optimiser steps of
        :meth:`fit`, on ``batch_loss(x_B, y_B, B)`` whose ``y_B`` carries no information
        (zeros), without the epoch hooks, BatchNorm recalibration, evaluation or checkpoints
        (which all presume a classifier). ``images`` is any tensor of samples on its first
        dimension: float images or signals (checked as :meth:`fit`'s), or integer samples such
        as token ids (not flipped). Returns the mean loss of every epoch; the model is left in
        eval mode.
        """
        if self._fitted:
            raise RuntimeError(f"this {type(self).__name__} has already been fitted")
        self._fitted = True
        if not isinstance(images, torch.Tensor) or images.ndim < 1 or len(images) == 0:
            raise ValueError("images must be a non-empty tensor of samples [n, ...]")
        if images.is_floating_point():
            images = check_split((images, torch.zeros(len(images), dtype=torch.long)),
                                 "images")[0]
        elif self.config.flip:
            raise ValueError("integer samples (token ids) cannot be flipped: pass flip=False")
        self.train_data = images, torch.zeros(len(images), dtype=torch.long)
        self.model.to(self.device)
        losses = [self._train_epoch() for _ in tqdm(
            range(self.config.epochs), desc=self.method, unit="epoch", leave=False,
            disable=not self.config.progress)]
        self.model.eval()
        return losses

    def _train_epoch(self) -> float:
        assert self.train_data is not None
        x_all, y_all = self.train_data
        self.model.train()
        order = torch.randperm(len(x_all), generator=self.generator)
        total, batches = 0.0, 0
        for index in split_batches(order, self.config.batch_size,
                                   self.config.join_single_batch):
            x = x_all[index].to(self.device)
            if self.config.flip:
                x = random_flip(x, self.generator)
            y = y_all[index].to(self.device)
            self.optimizer.zero_grad()
            loss = self.batch_loss(x, y, index)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
            batches += 1
        return total / batches

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode class predictions for images ``x``."""
        self.model.eval()
        return torch.cat([
            self.model(part.to(self.device)).argmax(1).cpu()
            for part in x.split(self.config.eval_batch_size)
        ])

    def accuracy(self, split: Split) -> float:
        """Fraction of ``split`` predicted correctly (eval mode)."""
        x, y = split
        return float((self.predict(x) == y.cpu()).double().mean())

    def _save(self, path: Path, epoch: int, history: list[EpochRecord]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()}
        torch.save({
            "method": self.method,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [asdict(r) for r in history],
            "config": config,
        }, path)
