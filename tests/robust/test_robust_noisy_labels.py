"""The skin paper's methods: OUSM, LoOP weights, forward correction, reference losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastinfluence import reference
from fastinfluence.robust import (
    DETECTORS,
    ForwardConfig,
    ForwardTrainer,
    OUSMConfig,
    OUSMLoOPConfig,
    OUSMLoOPTrainer,
    OUSMTrainer,
    detection_metrics,
    estimate_transition,
    forward_corrected_loss,
    local_outlier_probability,
    loop_weights,
    mislabel_scores,
    ousm_keep,
    ousm_loss,
    penultimate_features,
    precision_at_noise_count,
    reference_losses,
    roc_auc,
)

# -- OUSM -----------------------------------------------------------------------------------


def test_ousm_keeps_all_but_the_k_highest_losses():
    losses = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.7, 5.0])
    keep = ousm_keep(losses, 2)
    assert keep.tolist() == [True, False, True, True, True, False]
    loss, kept = ousm_loss(losses, 2)
    assert torch.equal(kept, keep)
    assert loss.item() == pytest.approx((0.5 + 0.1 + 2.0 + 0.7) / 4)
    assert ousm_keep(losses, 0).all()
    assert ousm_keep(losses[:2], 5).sum() == 1  # never the whole batch


def test_ousm_dropped_samples_get_no_gradient():
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    losses = F.cross_entropy(logits, y, reduction="none")
    loss, keep = ousm_loss(losses, 3)
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep] != 0).all()
    assert losses[~keep].min() >= losses[keep].max()


@pytest.mark.parametrize("drop", [-1, 1.5, True])
def test_ousm_bad_drop(drop):
    with pytest.raises(ValueError, match="drop"):
        ousm_keep(torch.zeros(4), drop)


class _CountingOUSM(OUSMTrainer):
    """Records how many samples each batch kept."""

    def ousm(self, losses, index):
        before = int(self.drop_counts.sum())
        loss = super().ousm(losses, index)
        self.log = getattr(self, "log", [])
        self.log.append((self.epoch, len(index), int(self.drop_counts.sum()) - before))
        return loss


def test_ousm_trainer_drops_k_per_batch_only_after_warmup(model, splits):
    config = OUSMConfig(epochs=3, warmup_epochs=1, drop=2, batch_size=8, lr=1e-3)
    trainer = _CountingOUSM(model, config)
    result = trainer.fit(*splits)
    assert [(e, d) for e, _, d in trainer.log] == [(0, 0), (0, 0), (1, 2), (1, 2), (2, 2), (2, 2)]
    counts = result.extras["drop_counts"]
    assert counts.sum() == 8 and counts.max() <= 2


# -- LoOP -----------------------------------------------------------------------------------


def _loop_by_definition(points: np.ndarray, extent: float, k: int) -> np.ndarray:
    """LoOP of one cluster, loop by loop (the slow, obvious twin)."""
    n = len(points)
    neighbours, pdist = [], np.empty(n)
    for i in range(n):
        d = [(math.dist(points[i], points[j]), j) for j in range(n) if j != i]
        d.sort()
        nearest = d[:k]
        neighbours.append([j for _, j in nearest])
        pdist[i] = extent * math.sqrt(sum(dist**2 for dist, _ in nearest) / k)
    plof = np.array([pdist[i] / np.mean([pdist[j] for j in neighbours[i]]) - 1
                     for i in range(n)])
    nplof = extent * math.sqrt(np.mean(plof**2))
    return np.array([max(0.0, math.erf(p / (nplof * math.sqrt(2)))) for p in plof])


def test_loop_matches_its_definition_per_cluster():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(60, 4))
    points[:25] += 5.0
    clusters = np.r_[np.zeros(25, int), np.ones(35, int)]
    got = local_outlier_probability(torch.from_numpy(points), torch.from_numpy(clusters),
                                    extent=2.0, n_neighbors=6).numpy()
    expected = np.empty(60)
    for c in (0, 1):
        expected[clusters == c] = _loop_by_definition(points[clusters == c], 2.0, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("n", "d", "extent", "k"), [(200, 2, 3, 10), (90, 16, 2, 7)])
def test_loop_matches_pynomaly(n, d, extent, k):
    loop = pytest.importorskip("PyNomaly.loop")
    rng = np.random.default_rng(n)
    points = rng.standard_t(3, size=(n, d))
    labels = rng.integers(0, 2, n)
    reference = loop.LocalOutlierProbability(
        points, extent=extent, n_neighbors=k, cluster_labels=labels.tolist(), progress_bar=False
    ).fit().local_outlier_probabilities
    got = local_outlier_probability(torch.from_numpy(points), torch.from_numpy(labels),
                                    extent=float(extent), n_neighbors=k)
    np.testing.assert_allclose(got.numpy(), np.asarray(reference, dtype=float), atol=1e-9)


def test_loop_weights_range_and_orientation():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(80, 3, generator=generator)
    labels = torch.arange(80) % 2
    features[labels == 1] += 8.0
    features[0] = torch.tensor([0.0, 0.0, 25.0])  # planted outlier of class 0
    features[1] = torch.tensor([8.0, 8.0, -17.0])  # planted outlier of class 1
    weights = loop_weights(features, labels, n_neighbors=10)
    assert weights.dtype == torch.float32 and weights.min() >= 0 and weights.max() <= 1
    assert int(weights[labels == 0].argmin()) == 0
    assert int(torch.nonzero(labels == 1)[weights[labels == 1].argmin()]) == 1
    assert weights[0] < 0.2 and weights[1] < 0.2
    assert torch.median(weights) > 0.9  # inliers keep (nearly) full weight


def test_loop_bad_input():
    with pytest.raises(ValueError, match="n_neighbors"):
        local_outlier_probability(torch.randn(8, 2), n_neighbors=8)
    with pytest.raises(ValueError, match="points"):
        local_outlier_probability(torch.randn(8))
    with pytest.raises(ValueError, match="clusters"):
        local_outlier_probability(torch.randn(8, 2), torch.zeros(7), n_neighbors=2)


def test_penultimate_features_are_the_last_linear_input(model, splits):
    x = splits[0][0][:5]
    model.train()
    features = penultimate_features(model, x)
    assert model.training  # the flag is restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.classifier(features), model(x))
    assert features.shape == (5, model.classifier.in_features)


class _RecordingLoOP(OUSMLoOPTrainer):
    def batch_loss(self, x, y, index):
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.epoch, bool((self.weights == 1).all())))
        return super().batch_loss(x, y, index)


def test_ousm_loop_weights_one_until_start_then_every_period(splits):
    torch.manual_seed(0)
    from fastinfluence.models import PaperCNN

    config = OUSMLoOPConfig(epochs=5, warmup_epochs=1, reweight_start=2, reweight_every=2,
                            n_neighbors=3, batch_size=8, lr=1e-3)
    trainer = _RecordingLoOP(PaperCNN(32), config)
    result = trainer.fit(*splits)
    assert result.extras["weight_epochs"] == [2, 4]
    unit = {epoch: flag for epoch, flag in trainer.seen}
    assert unit[0] and unit[1] and not unit[2]
    weights = result.extras["weights"]
    assert weights.shape == (16,) and weights.min() >= 0 and weights.max() <= 1


def test_ousm_loop_loss_is_alpha_ousm_plus_beta_weighted_ce(model, splits):
    config = OUSMLoOPConfig(epochs=2, warmup_epochs=0, drop=2, alpha=0.3, beta=0.7,
                            n_neighbors=3, batch_size=8)
    trainer = OUSMLoOPTrainer(model, config)
    trainer.train_data = splits[0]
    trainer.before_epoch(0)
    trainer.weights = torch.linspace(0.1, 1.0, 16)
    x, y = splits[0][0][:8], splits[0][1][:8]
    index = torch.arange(8)
    model.eval()
    got = trainer.batch_loss(x, y, index)
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none").double()
    kept = losses.sort().values[:6].mean()
    expected = 0.3 * kept + 0.7 * (trainer.weights[:8].double() * losses).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# -- forward correction ---------------------------------------------------------------------


def test_forward_correction_with_identity_is_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=generator)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(forward_corrected_loss(logits, y, eye), F.cross_entropy(logits, y))
    torch.testing.assert_close(forward_corrected_loss(logits, y, eye, "none"),
                               F.cross_entropy(logits, y, reduction="none"))


def test_forward_correction_by_definition():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    T = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    p = torch.softmax(logits, 1)
    expected = [-math.log(sum(p[n, i] * T[i, y[n]] for i in range(2))) for n in range(5)]
    got = forward_corrected_loss(logits, y, T, "none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_estimator_recovers_a_known_transition_matrix():
    rng = np.random.default_rng(0)
    T = np.array([[0.7, 0.2, 0.1], [0.15, 0.8, 0.05], [0.1, 0.25, 0.65]])
    clean = rng.dirichlet(np.ones(3), size=3000)
    anchors = rng.integers(0, 3, 300)
    epsilon = rng.uniform(0, 0.01, (300, 1))
    clean[:300] = (1 - epsilon) * np.eye(3)[anchors] + epsilon * rng.dirichlet(np.ones(3), 300)
    noisy = torch.from_numpy(clean @ T)
    estimate = estimate_transition(noisy, 97.0).numpy()
    np.testing.assert_allclose(estimate, T, atol=0.01)
    # the argmax anchor picks an outlier when the top posteriors are corrupted
    corrupted = noisy.clone()
    corrupted[-5:] = torch.tensor([0.999, 0.0005, 0.0005], dtype=torch.float64)
    assert abs(estimate_transition(corrupted, 100.0)[0, 0] - 0.7) > 0.2
    assert abs(estimate_transition(corrupted, 97.0)[0, 0] - 0.7) < 0.01


def test_forward_trainer_estimates_then_corrects(model, splits):
    trainer = ForwardTrainer(model, ForwardConfig(epochs=2, estimation_epochs=1, batch_size=8,
                                                  lr=1e-3))
    result = trainer.fit(*splits)
    T = result.extras["transition"]
    assert T.shape == (3, 3) and torch.allclose(T.sum(1), torch.ones(3), atol=1e-5)
    assert len(result.history) == 2


def test_forward_config_validates_transition():
    with pytest.raises(ValueError, match="transition"):
        ForwardConfig(transition=((0.5, 0.6), (0.0, 1.0)))
    with pytest.raises(ValueError, match="estimation_epochs"):
        ForwardConfig(epochs=3, estimation_epochs=3)
    config = ForwardConfig(epochs=1, transition=((1.0, 0.0), (0.0, 1.0)))
    assert config.transition == ((1.0, 0.0), (0.0, 1.0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"drop": 32}, "drop"), ({"warmup_epochs": -1}, "warmup_epochs"),
])
def test_ousm_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OUSMConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": -0.1}, "alpha"), ({"alpha": 0, "beta": 0}, "both"),
    ({"reweight_every": 0}, "reweight_every"), ({"extent": 0}, "extent"),
])
def test_ousm_loop_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OUSMLoOPConfig(**kwargs)


# -- every trainer runs --------------------------------------------------------------------


@pytest.mark.parametrize(("trainer", "config"), [
    (OUSMTrainer, OUSMConfig(epochs=2, warmup_epochs=1, batch_size=8)),
    (OUSMLoOPTrainer, OUSMLoOPConfig(epochs=2, warmup_epochs=1, reweight_start=1,
                                     n_neighbors=3, batch_size=8)),
    (ForwardTrainer, ForwardConfig(epochs=2, estimation_epochs=1, batch_size=8)),
])
def test_each_trainer_runs_two_epochs(model, splits, trainer, config):
    train, val, (x, y) = splits
    test = (x, (y + 1) % 3)  # relabelled: its accuracy is not the validation split's
    result = trainer(model, config).fit(train, val, test)
    assert len(result.history) == 2
    assert all(math.isfinite(r.train_loss) for r in result.history)
    # the reported accuracies are the trained model's on each split
    with torch.no_grad():
        predicted = model.eval()(x).argmax(dim=1)
        val_predicted = model(val[0]).argmax(dim=1)
    assert result.final_test_accuracy == pytest.approx(
        float((predicted == test[1]).double().mean()))
    assert result.history[-1].val_accuracy == pytest.approx(
        float((val_predicted == val[1]).double().mean()))


# -- the paper's label noise ----------------------------------------------------------------


def test_reference_losses_score_only_the_held_out_part(model, splits):
    from fastinfluence.datasets import flip_labels_by_loss
    from fastinfluence.robust import TrainConfig

    x, y = splits[0]
    scores = reference_losses(model, (x, y), 6, TrainConfig(epochs=1, batch_size=8), seed=0)
    assert scores.candidates.sum() == 10
    assert torch.isnan(scores.losses[~scores.candidates]).all()
    assert torch.isfinite(scores.losses[scores.candidates]).all()
    model.eval()
    with torch.no_grad():
        direct = F.cross_entropy(model(x).double(), y, reduction="none")
    torch.testing.assert_close(scores.losses[scores.candidates], direct[scores.candidates])
    noisy, flipped = flip_labels_by_loss(y, scores.losses, 0.5, 3, candidates=scores.candidates)
    assert not flipped[~scores.candidates].any() and flipped.any()
    assert (noisy[flipped] != y[flipped]).all()
    with pytest.raises(ValueError, match="reference_size"):
        reference_losses(model, (x, y), 16)


# -- finding the flipped labels -------------------------------------------------------------


def test_detection_metrics_on_a_planted_ranking():
    # 3 flipped of 8; the top three scores hold two of them, a flipped one is ranked last.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1])
    flipped = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert precision_at_noise_count(scores, flipped) == pytest.approx(2 / 3)
    # pairs (flipped, clean) ordered right: 5 + 4 + 0 of 3·5
    assert roc_auc(scores, flipped) == pytest.approx(9 / 15)
    assert detection_metrics(-scores, flipped) == pytest.approx(
        {"precision": 1 / 3, "auc": 6 / 15})


def test_ties_at_the_cut_count_by_their_share_of_flipped():
    # k = 2: one sure hit above, one slot for the three tied 1's of which one is flipped.
    counts = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    flipped = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    assert precision_at_noise_count(counts, flipped) == pytest.approx((1 + 1 / 3) / 2)
    assert precision_at_noise_count(counts.flip(0), flipped.flip(0)) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(seed)
    flipped = torch.rand(300, generator=generator) < 0.2
    scores = torch.randint(0, 12, (300,), generator=generator).double() + 2.0 * flipped
    assert roc_auc(scores, flipped) == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)


def test_detection_metrics_bad_input():
    with pytest.raises(ValueError, match="some but not all"):
        roc_auc(torch.rand(4), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        precision_at_noise_count(torch.rand(4), torch.tensor([1, 0, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([0.0, math.nan]), torch.tensor([True, False]))


def test_mislabel_scores_by_their_definitions(model, splits, head_influence):
    (x, y), val, _ = splits
    noisy = y.clone()
    noisy[:3] = (noisy[:3] + 1) % 3
    model.train()
    found = mislabel_scores(model, (x, noisy), val, n_neighbors=3, damping=0.01)
    assert model.training
    assert set(found.scores) == set(DETECTORS)
    assert found.scoring == "head-closed-form"
    assert found.report.path == "head-closed-form" and found.report.solve.converged
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(found.scores["loss"],
                                   F.cross_entropy(model(x).double(), noisy, reduction="none"))
    features = penultimate_features(model, x)
    torch.testing.assert_close(found.scores["loop"], local_outlier_probability(
        features, noisy, n_neighbors=3))
    # both influences against the float64 textbook over the last layer
    textbook = head_influence(model, (x, noisy), val, 0.01)
    torch.testing.assert_close(found.scores["val_influence"], textbook.scores,
                               rtol=1e-4, atol=1e-6)
    self_textbook = reference.self_influence(textbook.model, textbook.head,
                                             (x.double(), noisy), 0.01)
    torch.testing.assert_close(found.scores["self_influence"], self_textbook,
                               rtol=1e-4, atol=1e-6)
