"""Label noise: symmetric random flips, and the skin paper's loss-ranked flips.

Both flip ``round(rate * n_c)`` labels of every class ``c`` (ties rounding half up) and give
each flipped sample a different class drawn uniformly, so with two classes the label is
simply swapped. This is the skin paper's definition (``y' = y`` with probability ``1 - rate``,
otherwise another class) with the per-class count fixed instead of random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

LabelsLike = Sequence[int] | np.ndarray | torch.Tensor


def flip_labels_symmetric(
    labels: LabelsLike,
    rate: float,
    num_classes: int | None = None,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a random ``rate`` fraction of each class to another class, uniformly.

    Returns:
        ``(noisy_labels, flipped)``: int64 labels and a bool mask of the flipped samples.
    """
    labels_np, num_classes = _check(labels, rate, num_classes)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(members)[: _count(rate, len(members))]
        for members in _classes(labels_np, num_classes)
    ]
    return _flip(labels_np, np.concatenate(chosen), num_classes, rng)


def flip_labels_by_loss(
    labels: LabelsLike,
    losses: Sequence[float] | np.ndarray | torch.Tensor,
    rate: float,
    num_classes: int | None = None,
    *,
    candidates: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The skin paper's scheme: in each class, flip the ``rate`` fraction of samples with the
    highest loss under a reference model (simulating plausible misdiagnoses).

    The paper trains the reference model on a random subset and scores the other samples;
    pass those as ``candidates`` (the subset the reference model did not see): then only
    candidates are flipped and ``rate`` applies to the candidates of each class. Ties in
    the loss go to the lower index.

    Args:
        labels: clean labels ``[N]``.
        losses: per-sample losses ``[N]`` of the reference model (finite; only the
            candidates' values are used).
        rate: fraction ``gamma`` of each class to flip (paper: 0.05, 0.1, 0.2, 0.4).
        num_classes: number of classes (default ``max(labels) + 1``).
        candidates: bool mask ``[N]`` of the samples that may be flipped (default all).
        seed: seeds the choice of the new class (only matters with more than two classes).

    Returns:
        ``(noisy_labels, flipped)``: int64 labels and a bool mask of the flipped samples.
    """
    labels_np, num_classes = _check(labels, rate, num_classes)
    losses_np = np.asarray(
        losses.detach().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64
    )
    if losses_np.shape != labels_np.shape:
        raise ValueError(f"losses must have shape {labels_np.shape}, got {losses_np.shape}")
    if candidates is None:
        allowed = np.ones(len(labels_np), dtype=bool)
    else:
        allowed = np.asarray(
            candidates.cpu() if isinstance(candidates, torch.Tensor) else candidates
        )
        if allowed.shape != labels_np.shape or allowed.dtype != np.bool_:
            raise ValueError(f"candidates must be a bool mask of shape {labels_np.shape}")
    if not np.isfinite(losses_np[allowed]).all():
        raise ValueError("losses contain NaN or Inf")
    chosen = []
    for members in _classes(labels_np, num_classes):
        members = members[allowed[members]]
        ranked = members[np.argsort(-losses_np[members], kind="stable")]
        chosen.append(ranked[: _count(rate, len(members))])
    return _flip(labels_np, np.concatenate(chosen), num_classes, np.random.default_rng(seed))


def _check(labels: LabelsLike, rate: float, num_classes: int | None) -> tuple[np.ndarray, int]:
    array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    found = int(array.max()) + 1
    num_classes = found if num_classes is None else num_classes
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if array.min() < 0 or array.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes})")
    return array.astype(np.int64), num_classes


def _classes(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.nonzero(labels == c)[0] for c in range(num_classes)]


def _count(rate: float, n: int) -> int:
    return int(np.floor(rate * n + 0.5))


def _flip(
    labels: np.ndarray, chosen: np.ndarray, num_classes: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    noisy = labels.copy()
    chosen = np.sort(chosen.astype(np.int64))
    shift = rng.integers(1, num_classes, size=len(chosen))  # never 0: always another class
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[chosen] = True
    return torch.from_numpy(noisy), torch.from_numpy(flipped)
