"""Per-sample losses for ``Influence(loss_fn=...)`` beyond the default cross-entropy.

A language model's sample is a sequence: its loss is the sum (or mean) of its token losses,
with padding left out, so that influence ranks training *sequences* (docs/design.md §2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")


def sequence_cross_entropy(
    reduction: str = "sum", ignore_index: int = -100, shift: bool = True
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A per-sequence language-model loss: ``loss_fn(logits [B, T, V], labels [B, T]) -> [B]``.

    Sequence ``i``'s loss is ``l_i = Σ_t m_it · CE(z_it, y_it)`` (``reduction="sum"``) or that
    sum over ``Σ_t m_it`` (``"mean"``; 0 for a sequence without a scored token), where
    ``m_it = [y_it ≠ ignore_index]`` masks padding and ``CE(z, y) = −log softmax(z)_y``. With
    ``shift=True`` (a causal language model given ``labels = input_ids``, as Hugging Face's
    ``labels`` are) position ``t``'s logits predict token ``t + 1``: the pairs are
    ``(z_{i,t}, y_{i,t+1})`` for ``t < T − 1``. Set padding labels to ``ignore_index``
    (``labels = input_ids.masked_fill(attention_mask == 0, -100)``).

    The ``"sum"`` loss makes a sequence count by its tokens, as a language model's training
    loss over a corpus of tokens does; ``"mean"`` makes every sequence count alike.

    Use it as ``Influence(model, train, val, loss_fn=sequence_cross_entropy(),
    output=lambda out: out.logits)`` with ``y`` the ``[n, T]`` labels.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
    return functools.partial(_sequence_cross_entropy, reduction=reduction,
                             ignore_index=ignore_index, shift=shift)


def _sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str,
                            ignore_index: int, shift: bool) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"sequence_cross_entropy needs logits [batch, length, vocabulary], "
                         f"got {shape} (pass output=lambda out: out.logits)")
    if labels.shape != logits.shape[:2] or labels.is_floating_point():
        raise ValueError(f"sequence_cross_entropy needs integer labels [batch, length] = "
                         f"{tuple(logits.shape[:2])}, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=ignore_index,
                             reduction="none")  # [B, T]; 0 where ignored
    total = tokens.sum(dim=1)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum(dim=1).clamp_min(1).to(total.dtype)
