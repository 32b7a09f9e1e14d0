"""Validated settings of the robust trainers (docs/design.md §5 for the paper's values).

Paper symbols: ``T`` = ``epochs``, ``T_pre`` = ``pretrain_epochs``, ``m`` = ``max_weight``,
``r`` = ``ratio``, ``γ`` = ``gamma``, ``η`` = ``lr``, ``α`` = ``alpha``, ``ε`` = ``epsilon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastinfluence.hessian.solvers import SOLVERS

EMPHASES = ("helpful", "harmful")
SELECTIONS = ("helpful", "harmful")
OPTIMIZERS = ("adam", "sgd")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class TrainConfig:
    """Settings shared by every trainer: the paper's training recipe (§6.1).

    Adam (or SGD, ``optimizer="sgd"``) with learning rate ``lr`` on mini-batches of
    ``batch_size``, a random horizontal flip of each training image with probability 1/2 when
    ``flip``, for ``epochs`` epochs; after every epoch the model is evaluated (eval mode) on the
    validation and test sets.

    The defaults are the paper's (``epochs=40``, Adam ``lr=0.01``, ``batch_size=32``). The
    embedded 64² brain-tumour data needs ``lr=1e-3``: at 0.01 eval-mode accuracy swings
    between chance and ~75 % from epoch to epoch (``docs/papers/data.md``,
    calibration notes), so pass ``lr=1e-3`` there.

    Attributes:
        epochs: ``T``, total training epochs (>= 1).
        lr: learning rate ``η`` (> 0).
        batch_size: training mini-batch size (>= 1).
        seed: seeds the batch order, the flips and every method's own randomness (the model's
            initialisation is the caller's: seed before building the model).
        flip: random horizontal flips of the training images.
        eval_batch_size: batch size of evaluation and influence passes (>= 1).
        checkpoint: when set, the model, optimiser, epoch and history are saved there
            (``torch.save``) after every epoch.
        recalibrate_bn: after every epoch, before evaluation (and so before the influence
            computation of ISR/ISP), replace the BatchNorm running statistics by their average
            over the un-augmented training images. Off by default (the paper does not); at
            64² the running averages lag for the first ~60 steps (docs/papers/data.md), which
            makes early eval-mode accuracies and early influence meaningless.
        progress: show a tqdm bar over the epochs.
        device: where to train (``None``: the model's device).
        optimizer: ``"adam"`` (``torch.optim.Adam``, the ISR/ISP paper) or ``"sgd"``
            (``torch.optim.SGD``, the skin and denoising papers).
        momentum: SGD momentum (``0 <= momentum < 1``; only with ``optimizer="sgd"``).
        weight_decay: L2 penalty coefficient passed to the optimiser (>= 0).
        join_single_batch: a last training batch of a single item joins the one before it
            (:func:`~fastinfluence.robust.loop.split_batches`: train-mode BatchNorm cannot
            take one item on a 1×1 map). Off: that item trains alone as one more step, for
            models whose every BatchNorm sees several values per channel (N2V's U-Net on
            patches keeps its published batches so).
    """

    epochs: int = 40
    lr: float = 0.01
    batch_size: int = 32
    seed: int = 0
    flip: bool = True
    eval_batch_size: int = 256
    checkpoint: Path | str | None = None
    recalibrate_bn: bool = False
    progress: bool = False
    device: str | None = None
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    join_single_batch: bool = True

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_positive("lr", self.lr)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        for name in ("flip", "recalibrate_bn", "progress", "join_single_batch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, Path)):
            raise ValueError(f"checkpoint must be a path or None, got {self.checkpoint!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device must name a torch device, got {self.device!r}") from error
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be < 1, got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum is an SGD setting; optimizer is {self.optimizer!r}")


@dataclass
class ATConfig(TrainConfig):
    """Adversarial training with FGSM and uniform initialisation (Wong et al. 2020).

    Attributes:
        epsilon: ``ε``, the L∞ radius of the perturbation (> 0; paper 0.1).
        alpha: ``α``, the FGSM step (> 0; paper 0.03).
    """

    epsilon: float = 0.1
    alpha: float = 0.03

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("epsilon", self.epsilon)
        _check_positive("alpha", self.alpha)


@dataclass
class InfluenceConfig(TrainConfig):
    """Settings shared by the influence-based trainers (ISR, ISP).

    Influence is computed once, after ``pretrain_epochs`` warm-up epochs, with
    :class:`fastinfluence.Influence` over the final Linear layer (``params="last"``) against
    the clean validation set, on the un-augmented training images.

    Attributes:
        pretrain_epochs: ``T_pre``, warm-up epochs before the influence computation
            (``0 <= T_pre < T``; paper 10).
        damping: ``λ`` in ``H + λI`` of the inverse-Hessian solve (>= 0).
        solver: the inverse-HVP solver of :class:`fastinfluence.Influence`.
    """

    pretrain_epochs: int = 10
    damping: float = 0.01
    solver: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("pretrain_epochs", self.pretrain_epochs, 0)
        if self.pretrain_epochs >= self.epochs:
            raise ValueError(
                f"pretrain_epochs must be < epochs (influence is used for the remaining "
                f"epochs), got pretrain_epochs={self.pretrain_epochs}, epochs={self.epochs}"
            )
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not (
            math.isfinite(self.damping) and self.damping >= 0
        ):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        _check_choice("solver", self.solver, SOLVERS)


@dataclass
class ISRConfig(InfluenceConfig):
    """Influence-based Sample Reweighting (Algorithm 1).

    Attributes:
        max_weight: ``m``, the largest sample weight (>= 1; paper 2).
        emphasis: which end of the influence ranking gets weight ``m``: ``"helpful"``
            (Algorithm 1 and the authors' code, the default) or ``"harmful"`` (the §4.2 prose).
    """

    max_weight: float = 2.0
    emphasis: str = "helpful"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("max_weight", self.max_weight)
        if self.max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight!r}")
        _check_choice("emphasis", self.emphasis, EMPHASES)


@dataclass
class InfluenceRemovalConfig(InfluenceConfig):
    """Influence-based removal of the most harmful training samples (for noisy labels).

    Attributes:
        ratio: ``r``, the fraction of training samples removed after ``pretrain_epochs``
            (``0 < r < 1``; default 0.1).
    """

    ratio: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("ratio", self.ratio)
        if self.ratio >= 1:
            raise ValueError(f"ratio must lie in (0, 1) (something must stay), got "
                             f"{self.ratio!r}")


@dataclass
class ISPConfig(InfluenceConfig):
    """Influence-based Sample Perturbation (Algorithm 2).

    Attributes:
        ratio: ``r``, the fraction of training samples perturbed (``0 < r <= 1``; paper 0.1).
        gamma: ``γ``, the perturbation scale (> 0; paper 0.01).
        selection: ``"helpful"`` (ascending influence, Algorithm 2 and the authors' code, the
            default) or ``"harmful"`` (descending, the §5.2 prose).
        clip: the valid intensity range the perturbed images are clipped to.
    """

    ratio: float = 0.1
    gamma: float = 0.01
    selection: str = "helpful"
    clip: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("ratio", self.ratio)
        if self.ratio > 1:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio!r}")
        _check_positive("gamma", self.gamma)
        _check_choice("selection", self.selection, SELECTIONS)
        low, high = self.clip
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"clip must be a finite (low, high) with low < high, got {self.clip}")


@dataclass
class OUSMConfig(TrainConfig):
    """Online uncertainty sample mining (the skin paper's §2.1; values not in the paper are
    docs/design.md §5's reference defaults).

    Attributes:
        drop: ``K``, the highest-loss samples left out of every mini-batch (>= 0; default 2
            of a batch of 32).
        warmup_epochs: epochs of plain cross-entropy before mining starts (>= 0; default 5).
    """

    drop: int = 2
    warmup_epochs: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("drop", self.drop, 0)
        _check_int("warmup_epochs", self.warmup_epochs, 0)
        if self.drop >= self.batch_size:
            raise ValueError(f"drop must be < batch_size ({self.batch_size}), got {self.drop}")


@dataclass
class OUSMLoOPConfig(OUSMConfig):
    """OUSM with re-weighting by the local outlier probability (the skin paper's Eq. 1).

    Attributes:
        alpha: ``α``, weight of the OUSM loss (>= 0; paper 0.5).
        beta: ``β``, weight of the LoOP-weighted cross-entropy (>= 0; paper 0.5).
        reweight_start: epochs with all weights 1 (>= 0; paper 5).
        reweight_every: recompute the weights every this many epochs (>= 1; paper 5).
        extent: LoOP's ``λ`` (> 0; default 3).
        n_neighbors: LoOP's neighbourhood size ``k`` within each class (>= 1; default 10).
    """

    alpha: float = 0.5
    beta: float = 0.5
    reweight_start: int = 5
    reweight_every: int = 5
    extent: float = 3.0
    n_neighbors: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.alpha + self.beta == 0:
            raise ValueError("alpha and beta must not both be 0")
        _check_int("reweight_start", self.reweight_start, 0)
        _check_int("reweight_every", self.reweight_every, 1)
        _check_positive("extent", self.extent)
        _check_int("n_neighbors", self.n_neighbors, 1)


@dataclass
class ForwardConfig(TrainConfig):
    """Patrini et al.'s forward loss correction.

    Attributes:
        estimation_epochs: plain cross-entropy epochs before ``T`` is estimated
            (``1 <= estimation_epochs < epochs``; default 5); ignored when ``transition`` is
            given.
        percentile: the per-class percentile of Patrini's estimator (``(0, 100]``; 97).
        transition: a known ``T`` (row-stochastic, ``T[i][j] = P(noisy j | true i)``), used
            from the first epoch instead of an estimate.
    """

    estimation_epochs: int = 5
    percentile: float = 97.0
    transition: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("percentile", self.percentile)
        if self.percentile > 100:
            raise ValueError(f"percentile must lie in (0, 100], got {self.percentile!r}")
        if self.transition is None:
            _check_int("estimation_epochs", self.estimation_epochs, 1)
            if self.estimation_epochs >= self.epochs:
                raise ValueError(
                    f"estimation_epochs must be < epochs (the corrected loss trains the rest), "
                    f"got estimation_epochs={self.estimation_epochs}, epochs={self.epochs}"
                )
            return
        matrix = torch.as_tensor(self.transition, dtype=torch.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
            raise ValueError(f"transition must be a square [c, c] matrix, c >= 2, got "
                             f"{tuple(matrix.shape)}")
        if not bool(torch.isfinite(matrix).all()) or bool((matrix < 0).any()) or not bool(
            torch.allclose(matrix.sum(1), torch.ones(len(matrix), dtype=torch.float64))
        ):
            raise ValueError("transition must be non-negative with rows summing to 1")
        self.transition = tuple(tuple(float(v) for v in row) for row in matrix.tolist())
