"""``fastinfluence.losses.sequence_cross_entropy`` against a loop over sequences and tokens."""

from __future__ import annotations

import pytest
import torch

from fastinfluence.losses import sequence_cross_entropy


def token_loop(logits, labels, reduction, ignore_index, shift):
    """Each sequence's ``−log softmax(z_t)[y_t]`` over its scored tokens, one by one."""
    losses = []
    for z, y in zip(logits, labels, strict=True):
        pairs = zip(z[:-1], y[1:], strict=True) if shift else zip(z, y, strict=True)
        terms = [-torch.log_softmax(zt, dim=0)[yt] for zt, yt in pairs if yt != ignore_index]
        total = sum(terms, torch.zeros((), dtype=logits.dtype))
        losses.append(total / max(len(terms), 1) if reduction == "mean" else total)
    return torch.stack(losses)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_sequence_losses_match_a_loop_over_tokens(reduction, shift):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 7, (5, 6), generator=generator)
    labels[1, 3:] = -100  # padding
    labels[2, :] = -100  # a sequence with no scored token: loss 0
    labels[3, 2] = 4
    loss = sequence_cross_entropy(reduction, shift=shift)(logits, labels)
    expected = token_loop(logits, labels, reduction, -100, shift)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss[2] == 0
    other = labels.masked_fill(labels == -100, 6)  # padding marked by another id
    torch.testing.assert_close(sequence_cross_entropy(reduction, 6, shift)(logits, other),
                               token_loop(logits, other, reduction, 6, shift))


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="reduction"):
        sequence_cross_entropy("none")
    with pytest.raises(TypeError, match="ignore_index"):
        sequence_cross_entropy(ignore_index=-100.0)
    with pytest.raises(ValueError, match=r"logits \[batch, length, vocabulary\]"):
        sequence_cross_entropy()(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels"):
        sequence_cross_entropy()(torch.randn(3, 4, 5), torch.zeros(3, 5, dtype=torch.long))
