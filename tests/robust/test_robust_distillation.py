"""The MRS paper's methods: distillation, mixing, noise augmentation, baselines, metrics,
influence-based selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastinfluence as fi
from fastinfluence.models import ResCNN1d
from fastinfluence.robust.distillation import (
    BalancedTrainer,
    DistillationConfig,
    DistillationTrainer,
    MRSConfig,
    baseline_scores,
    certain_samples,
    classification_metrics,
    influence_certain,
    mix_certain,
    noise_augment,
    oversample_indices,
    smote_balance,
)


def spectra_split(n: int, seed: int, length: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 1, L]`` noise; class 1 has a bump in the middle, and 1 in 3 samples is class 1."""
    generator = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 3 == 0).long()
    x = torch.randn(n, 1, length, generator=generator)
    bump = torch.exp(-0.5 * ((torch.arange(length) - length / 2) / 2.0) ** 2)
    return x + 3 * y[:, None, None] * bump, y


def test_certain_samples_are_those_at_or_above_the_threshold():
    p = torch.tensor([[0.99, 0.01], [0.5, 0.5], [0.005, 0.995], [0.989, 0.011], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    assert certain_samples(p, labels, 0.99).tolist() == [0, 2]
    assert certain_samples(p, labels, 0.99, require_agreement=True).tolist() == [0]
    assert certain_samples(p, labels, 0.8).tolist() == [0, 2, 3, 4]


class Recording(DistillationTrainer):
    """Records the probabilities the distillation test saw, independently of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def after_epoch(self, epoch):
        self.seen.append(self.probabilities(self.pool[0]))
        super().after_epoch(epoch)


def test_distillation_collects_the_certain_samples_of_the_first_epochs():
    train = spectra_split(60, 0)
    torch.manual_seed(0)
    trainer = Recording(ResCNN1d(width=2, blocks=2, dropout=0.0),
                        DistillationConfig(epochs=4, distill_epochs=3, threshold=0.6, lr=1e-2,
                                           batch_size=16))
    result = trainer.fit(train, train, train)
    assert len(result.history) == 4 and len(trainer.certain_by_epoch) == 3
    for epoch, probabilities in enumerate(trainer.seen[:3]):
        # scored on the original 60 samples, not the oversampled training set
        assert len(probabilities) == 60
        expected = torch.nonzero(probabilities.max(1).values >= 0.6)[:, 0]
        assert torch.equal(trainer.certain_by_epoch[epoch], expected)
        assert torch.equal(trainer.probabilities_by_epoch[epoch], probabilities)
    union = torch.unique(torch.cat(trainer.certain_by_epoch[:2]))
    assert torch.equal(trainer.certain(2), union)
    assert len(trainer.certain()) > 0
    assert result.extras["certain_by_epoch"] is trainer.certain_by_epoch
    with pytest.raises(ValueError, match="epochs"):
        trainer.certain(4)
    with pytest.raises(ValueError, match="distill_epochs"):
        DistillationConfig(epochs=3, distill_epochs=4)


def test_oversampling_balances_the_classes():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    index = oversample_indices(labels, torch.Generator().manual_seed(0))
    assert torch.equal(index[:8], torch.arange(8))
    assert torch.bincount(labels[index]).tolist() == [5, 5, 5]
    trainer = BalancedTrainer(ResCNN1d(width=2, blocks=2), MRSConfig(epochs=1))
    x, y = spectra_split(30, 1)
    trainer.fit((x, y), (x, y), (x, y))
    assert torch.bincount(trainer.train_data[1]).tolist() == [20, 20]


def test_smote_synthesises_minority_samples_between_same_class_neighbours():
    """SMOTE, not duplication: every sample once, then new class-1 samples, each on the
    segment between a class-1 sample and one of its 5 nearest class-1 neighbours."""
    pytest.importorskip("imblearn")
    x, y = spectra_split(40, 3, length=12)  # 14 of class 1, 26 of class 0
    balanced_x, balanced_y = smote_balance(x, y, seed=0)
    assert torch.equal(balanced_x[:40], x) and torch.equal(balanced_y[:40], y)
    assert torch.bincount(balanced_y).tolist() == [26, 26] and (balanced_y[40:] == 1).all()
    minority = x[y == 1].flatten(1).double()
    distances = torch.cdist(minority, minority)
    neighbours = distances.argsort(1)[:, 1:6]  # the 5 nearest, itself excluded
    for synthetic in balanced_x[40:].flatten(1).double():
        assert not (minority - synthetic).abs().amax(1).lt(1e-6).any()  # no duplicate
        found = False
        for i in range(len(minority)):
            for n in neighbours[i]:
                step = minority[n] - minority[i]
                u = ((synthetic - minority[i]) @ step / (step @ step)).item()
                if 0 <= u <= 1 and torch.allclose(minority[i] + u * step, synthetic, atol=1e-5):
                    found = True
        assert found
    trainer = BalancedTrainer(ResCNN1d(width=2, blocks=2), MRSConfig(epochs=1,
                                                                     balancing="smote"))
    trainer.fit((x, y), (x, y), (x, y))
    assert torch.bincount(trainer.train_data[1]).tolist() == [26, 26]
    assert not torch.equal(trainer.train_data[0][40:], x[y == 1][:12])
    with pytest.raises(ValueError, match="at least 2 samples"):
        smote_balance(x[:27], y[:27].clone().fill_(0).index_fill_(0, torch.tensor([0]), 1), 0)
    with pytest.raises(ValueError, match="balancing"):
        MRSConfig(balancing="SMOTE")
    unbalanced = BalancedTrainer(ResCNN1d(width=2, blocks=2), MRSConfig(epochs=1,
                                                                        balancing="none"))
    unbalanced.fit((x, y), (x, y), (x, y))
    assert torch.bincount(unbalanced.train_data[1]).tolist() == [26, 14]


@pytest.mark.parametrize("strategy", ["same", "other", "both"])
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_mixing_weights_labels_and_counts(strategy, alpha):
    x, y = spectra_split(30, 2)
    certain = torch.tensor([0, 1, 2, 3, 4, 6, 9, 10, 20])
    mixed = mix_certain(x, y, certain, strategy=strategy, factor=4, alpha=alpha,
                        generator=torch.Generator().manual_seed(0))
    assert len(mixed.x) == 4 * len(certain)
    assert torch.equal(mixed.target, certain.repeat_interleave(4))
    torch.testing.assert_close(mixed.x, (1 - alpha) * x[mixed.target] + alpha * x[mixed.partner])
    assert torch.equal(mixed.y, y[mixed.target])
    assert set(mixed.partner.tolist()) <= set(certain.tolist())
    assert not (mixed.partner == mixed.target).any()
    same = y[mixed.partner] == y[mixed.target]
    if strategy == "same":
        assert same.all()
    elif strategy == "other":
        assert not same.any()
    else:
        assert same.any() and not same.all()


def test_mixing_without_a_partner_says_so():
    x, y = spectra_split(9, 3)
    with pytest.raises(ValueError, match="no partner"):
        mix_certain(x, y, torch.tensor([1, 2, 4]), strategy="other")
    with pytest.raises(ValueError, match="strategy"):
        mix_certain(x, y, torch.tensor([1, 2]), strategy="mixed")


def test_noise_augmentation():
    x, y = spectra_split(20, 4)
    xa, ya = noise_augment(x, y, factor=3, sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert xa.shape == (80, 1, 48) and torch.equal(ya, y.repeat(4))
    assert torch.equal(xa[:20], x)
    noise = xa[20:] - x.repeat(3, 1, 1)
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)


def test_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.4, 0.7, 0.2, 0.6, 0.1])
    patients = np.array(["a", "a", "b", "c", "c", "d"])
    m = classification_metrics(labels, scores, patients)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # positives above negatives: 0.9 > both, 0.7 > both, 0.4 > 0.2 only, 0.1 > neither
    assert m["auc"] == pytest.approx(5 / 8)
    # patient means: a 0.65 (tumour, right), b 0.7 (right), c 0.4 (healthy, right), d 0.1
    assert m["patient_accuracy"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("kind", ["svm", "rf"])
def test_baselines_learn_a_planted_bump(kind):
    x, y = spectra_split(90, 5)
    xt, yt = spectra_split(60, 6)
    scores, threshold = baseline_scores(kind, x[:, 0].numpy(), y.numpy(), xt[:, 0].numpy())
    assert scores.shape == (60,)
    m = classification_metrics(yt.numpy(), scores, np.arange(60).astype(str), threshold)
    assert m["auc"] > 0.9 and m["accuracy"] > 0.8


def test_influence_selection_runs_the_fused_pass_through_the_residual_adds():
    x, y = spectra_split(40, 7, length=64)
    torch.manual_seed(0)
    model = ResCNN1d(width=2).eval()
    clean = spectra_split(12, 8, length=64)
    chosen = influence_certain(model, (x, y), clean, 10)
    assert chosen.scoring == "fused-tangent"
    assert len(chosen.certain) == 10 and torch.equal(chosen.certain, chosen.certain.sort().values)
    # The same CG solve (float32's default tol, 1e-4, leaves 1e-4-relative differences from a
    # direct solve), so the scores agree to rounding.
    expected = fi.Influence(model, (x, y), clean, params=["blocks.7.bn2", "fc"], damping=0.01,
                            hessian="gauss-newton", solver="cg").scores()
    torch.testing.assert_close(chosen.scores, expected.cpu(), rtol=1e-4, atol=1e-6)
    assert set(chosen.certain.tolist()) == set(torch.argsort(expected)[:10].tolist())
    own = influence_certain(model, (x, y), clean, 5, selection="self", params="last")
    assert own.scoring == "head-closed-form" and (own.scores >= 0).all()
    assert set(own.certain.tolist()) == set(torch.argsort(own.scores)[:5].tolist())


def test_influence_selection_with_the_pool_shortcut_falls_back_and_says_why():
    """The fused tangent pass has no rule for the paper's max-pool shortcut: the selection
    still runs (torch.func.jvp), agrees with Influence's scores, and the reason is reported."""
    x, y = spectra_split(40, 7, length=64)
    torch.manual_seed(0)
    model = ResCNN1d(width=2, shortcut="pool").eval()
    clean = spectra_split(12, 8, length=64)
    chosen = influence_certain(model, (x, y), clean, 10)
    assert chosen.scoring == "torch.func.jvp"
    influence = fi.Influence(model, (x, y), clean, params=["blocks.7.bn2", "fc"], damping=0.01,
                             hessian="gauss-newton", solver="cg")
    expected = influence.scores()
    assert "MaxPool1d" in influence.report.scoring_reason
    torch.testing.assert_close(chosen.scores, expected.cpu(), rtol=1e-4, atol=1e-6)
