"""The skin noisy-label paper's methods (Xue et al., ISBI 2019; docs/design.md §5): online
uncertainty sample mining (OUSM), OUSM with re-weighting by the local outlier probability
(LoOP) of the penultimate features, Patrini et al.'s forward loss correction, and the
reference-network losses that make the paper's label noise.

Conventions: ``T[i, j] = P(noisy label j | true class i)`` (rows sum to 1); LoOP is
Kriegel et al. 2009 as PyNomaly computes it (the tests compare the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.robust.config import (
    ForwardConfig,
    OUSMConfig,
    OUSMLoOPConfig,
    TrainConfig,
)
from fastinfluence.robust.loop import Split, Trainer, check_split
from fastinfluence.scoring import Influence, InfluenceReport

# -- OUSM -----------------------------------------------------------------------------------


def ousm_keep(losses: torch.Tensor, drop: int) -> torch.Tensor:
    """Bool mask ``[n]`` of the samples OUSM keeps: all but the ``drop`` highest losses
    (at most ``n − 1`` are dropped, so a small last batch still trains; ties drop the lower
    index first)."""
    if losses.ndim != 1:
        raise ValueError(f"losses must be 1-D, got shape {tuple(losses.shape)}")
    if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
        raise ValueError(f"drop must be an integer >= 0, got {drop!r}")
    keep = torch.ones_like(losses, dtype=torch.bool)
    count = min(drop, len(losses) - 1)
    if count > 0:
        order = torch.argsort(losses.detach(), descending=True, stable=True)
        keep[order[:count]] = False
    return keep


def ousm_loss(losses: torch.Tensor, drop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_OUSM``: the mean per-sample loss over the samples :func:`ousm_keep` keeps (the
    dropped ones get no gradient). Returns ``(loss, keep)``."""
    keep = ousm_keep(losses, drop)
    return losses[keep].mean(), keep


class OUSMTrainer(Trainer):
    """Online uncertainty sample mining (§2.1): plain cross-entropy for ``warmup_epochs``
    epochs, then on every mini-batch the ``drop`` samples with the highest loss are left out
    (:func:`ousm_loss`). After :meth:`fit`, ``drop_counts[i]`` is how many times training
    sample ``i`` was left out (a mislabel score; also in ``result.extras``)."""

    method = "ousm"
    config_type = OUSMConfig
    config: OUSMConfig

    def __init__(self, model: nn.Module, config: OUSMConfig | None = None) -> None:
        super().__init__(model, config)
        self.epoch = 0
        self.drop_counts: torch.Tensor | None = None

    def before_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.drop_counts is None:
            assert self.train_data is not None
            self.drop_counts = torch.zeros(len(self.train_data[1]), dtype=torch.int64)

    def mining(self) -> bool:
        """Whether OUSM drops samples in the current epoch."""
        return self.epoch >= self.config.warmup_epochs

    def ousm(self, losses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``L_OUSM`` of a batch (plain mean during warm-up), counting the drops."""
        if not self.mining():
            return losses.mean()
        loss, keep = ousm_loss(losses, self.config.drop)
        assert self.drop_counts is not None
        self.drop_counts[index[~keep.cpu()]] += 1
        return loss

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.ousm(F.cross_entropy(self.model(x), y, reduction="none"), index)

    def extras(self) -> dict[str, Any]:
        return {"drop_counts": self.drop_counts}


# -- LoOP -----------------------------------------------------------------------------------


def local_outlier_probability(
    points: torch.Tensor,
    clusters: torch.Tensor | None = None,
    *,
    extent: float = 3.0,
    n_neighbors: int = 10,
) -> torch.Tensor:
    """Local outlier probabilities (LoOP, Kriegel et al. 2009) of ``points`` ``[n, d]``,
    within each cluster of ``clusters`` ``[n]`` (all one cluster when None).

    With ``N(i)`` the ``k = n_neighbors`` nearest other points of ``i``'s cluster (Euclidean)
    and ``λ = extent``:
    ``pdist_i = λ·sqrt(mean_{j∈N(i)} d(i, j)²)``,
    ``PLOF_i = pdist_i / mean_{j∈N(i)} pdist_j − 1``,
    ``nPLOF = λ·sqrt(mean_{cluster} PLOF²)``,
    ``LoOP_i = max(0, erf(PLOF_i / (nPLOF·√2)))`` in ``[0, 1]`` (0 for an inlier; all 0 when
    every ``PLOF`` is 0). Computed in float64 with dense distances per cluster.
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"points must be a non-empty [n, d] tensor, got {tuple(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points contain NaN or Inf")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
    if not (isinstance(extent, int | float) and math.isfinite(extent) and extent > 0):
        raise ValueError(f"extent must be a finite number > 0, got {extent!r}")
    if clusters is None:
        clusters = torch.zeros(len(points), dtype=torch.int64)
    if clusters.shape != (len(points),):
        raise ValueError(f"clusters must have shape ({len(points)},), got {tuple(clusters.shape)}")
    points = points.detach().to(torch.float64)
    clusters = clusters.to(points.device)
    result = torch.zeros(len(points), dtype=torch.float64, device=points.device)
    for cluster in torch.unique(clusters):
        members = torch.nonzero(clusters == cluster).flatten()
        if len(members) <= n_neighbors:
            raise ValueError(
                f"cluster {int(cluster)} has {len(members)} points; LoOP with "
                f"n_neighbors={n_neighbors} needs more than n_neighbors in every cluster"
            )
        x = points[members]
        distances = torch.cdist(x, x)
        distances.fill_diagonal_(math.inf)
        nearest, neighbours = torch.topk(distances, n_neighbors, dim=1, largest=False)
        pdist = extent * nearest.square().mean(1).sqrt()
        expected = pdist[neighbours].mean(1)
        plof = pdist / expected.clamp_min(1e-8) - 1
        nplof = extent * plof.square().mean().sqrt()
        if nplof == 0:
            continue
        result[members] = torch.special.erf(plof / (nplof * math.sqrt(2))).clamp_min(0)
    return result


@torch.no_grad()
def penultimate_features(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The input of ``model``'s last ``nn.Linear`` (its penultimate features, pooled when
    the model pools), for ``images`` in eval mode, ``[n, d]`` on the CPU. The model's
    ``training`` flag is restored."""
    return _features_and_outputs(model, images, batch_size, device)[0]


def _features_and_outputs(
    model: nn.Module, images: torch.Tensor, batch_size: int,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`penultimate_features` and the model's outputs, from one eval-mode pass."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear layer")
    device = next(model.parameters()).device if device is None else torch.device(device)
    captured: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(
        lambda _module, inputs: captured.append(inputs[0].flatten(1).cpu())
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for part in images.split(batch_size):
                outputs.append(model(part.to(device)).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured), torch.cat(outputs)


def loop_weights(
    features: torch.Tensor, labels: torch.Tensor, *, extent: float = 3.0, n_neighbors: int = 10
) -> torch.Tensor:
    """The paper's sample weights ``λ_i = 1 − LoOP_i`` in ``[0, 1]``, LoOP computed within
    each (noisy) label class on the features: outliers of their class get small weights."""
    probabilities = local_outlier_probability(
        features, labels, extent=extent, n_neighbors=n_neighbors
    )
    return (1 - probabilities).to(torch.float32)


class OUSMLoOPTrainer(OUSMTrainer):
    """OUSM plus individual re-weighting (Eq. 1 without the weight decay term):

    ``L = α·L_OUSM + β·(1/|B|) Σ_{i∈B} λ_i·CE_i``, with ``λ_i = 1 − LoOP_i``
    (:func:`loop_weights`) from the penultimate features of the un-augmented training images
    (eval mode) within each noisy-label class. All ``λ_i = 1`` for the first
    ``reweight_start`` epochs; then recomputed before epoch ``reweight_start`` and every
    ``reweight_every`` epochs after. After :meth:`fit`, ``weights`` holds the last ``λ`` and
    ``extras`` also ``weight_epochs`` (the 0-based epochs before which they were computed).
    """

    method = "ousm_loop"
    config_type = OUSMLoOPConfig
    config: OUSMLoOPConfig

    def __init__(self, model: nn.Module, config: OUSMLoOPConfig | None = None) -> None:
        super().__init__(model, config)
        self.weights: torch.Tensor | None = None
        self.weight_epochs: list[int] = []

    def before_epoch(self, epoch: int) -> None:
        super().before_epoch(epoch)
        assert self.train_data is not None
        config = self.config
        if self.weights is None:
            self.weights = torch.ones(len(self.train_data[1]))
        due = epoch >= config.reweight_start and (
            (epoch - config.reweight_start) % config.reweight_every == 0
        )
        if due:
            x, y = self.train_data
            features = penultimate_features(self.model, x, config.eval_batch_size, self.device)
            self.weights = loop_weights(features, y, extent=config.extent,
                                        n_neighbors=config.n_neighbors)
            self.weight_epochs.append(epoch)

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        assert self.weights is not None
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        weighted = (self.weights[index].to(losses) * losses).mean()
        return self.config.alpha * self.ousm(losses, index) + self.config.beta * weighted

    def extras(self) -> dict[str, Any]:
        return {**super().extras(), "weights": self.weights, "weight_epochs": self.weight_epochs}


# -- forward loss correction ----------------------------------------------------------------


def forward_corrected_loss(
    logits: torch.Tensor, targets: torch.Tensor, transition: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Patrini et al.'s forward correction: ``−log (softmax(f(x)) · T)[ỹ]``, the
    cross-entropy of the noisy label under the model's clean posterior pushed through
    ``T[i, j] = P(ỹ = j | y = i)``. With ``T = I`` it is plain cross-entropy.

    Args:
        logits: ``[n, c]``.
        targets: noisy labels ``[n]``.
        transition: ``[c, c]`` row-stochastic.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    classes = logits.shape[-1]
    if transition.shape != (classes, classes):
        raise ValueError(f"transition must be [{classes}, {classes}], got "
                         f"{tuple(transition.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    noisy = torch.softmax(logits, -1) @ transition.to(logits)
    losses = -torch.log(noisy.gather(1, targets[:, None]).squeeze(1).clamp_min(1e-12))
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


def estimate_transition(probabilities: torch.Tensor, percentile: float = 97.0) -> torch.Tensor:
    """Patrini et al.'s estimator of ``T`` from the softmax outputs ``[n, c]`` of a network
    trained on the noisy labels: for each class ``i``, the sample ``x̄_i`` with the largest
    ``p(ỹ = i | x)`` strictly below that column's ``percentile``-th percentile (the
    higher order statistic; the top few percent are treated as outliers) gives the row
    ``T[i, :] = p(ỹ | x̄_i)``. Without a percentile filter (``percentile=100``) it is the
    plain argmax anchor."""
    if probabilities.ndim != 2 or probabilities.shape[1] < 2 or len(probabilities) < 2:
        raise ValueError(f"probabilities must be [n >= 2, c >= 2], got "
                         f"{tuple(probabilities.shape)}")
    if not (isinstance(percentile, int | float) and 0 < percentile <= 100):
        raise ValueError(f"percentile must lie in (0, 100], got {percentile!r}")
    probabilities = probabilities.detach().to(torch.float64)
    rows = []
    for i in range(probabilities.shape[1]):
        column = probabilities[:, i]
        if percentile < 100:
            threshold = torch.quantile(column, percentile / 100, interpolation="higher")
            below = torch.where(column < threshold, column, torch.full_like(column, -1.0))
            anchor = int(below.argmax()) if bool((below >= 0).any()) else int(column.argmax())
        else:
            anchor = int(column.argmax())
        rows.append(probabilities[anchor])
    return torch.stack(rows)


class ForwardTrainer(Trainer):
    """Patrini et al.'s forward correction (the paper's Table 1 baseline).

    With ``config.transition`` set, ``T`` is that matrix and every epoch minimises
    :func:`forward_corrected_loss`. Otherwise the first ``estimation_epochs`` epochs are
    plain cross-entropy on the noisy labels, ``T`` is then estimated
    (:func:`estimate_transition`) from the eval-mode softmax on the un-augmented training
    images, and the remaining epochs minimise the corrected loss with the same model and
    optimiser (Patrini et al. retrain from scratch; with a fixed epoch budget this run
    continues instead). After :meth:`fit`, ``transition`` holds ``T``.
    """

    method = "forward"
    config_type = ForwardConfig
    config: ForwardConfig

    def __init__(self, model: nn.Module, config: ForwardConfig | None = None) -> None:
        super().__init__(model, config)
        self.transition: torch.Tensor | None = (
            None if self.config.transition is None
            else torch.tensor(self.config.transition, dtype=torch.float32)
        )

    def before_epoch(self, epoch: int) -> None:
        if self.config.transition is None and epoch == self.config.estimation_epochs:
            assert self.train_data is not None
            self.transition = estimate_transition(
                self.probabilities(self.train_data[0]), self.config.percentile
            ).float()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Eval-mode softmax outputs ``[n, c]`` (CPU)."""
        self.model.eval()
        out = torch.cat([torch.softmax(self.model(part.to(self.device)), -1).cpu()
                         for part in images.split(self.config.eval_batch_size)])
        self.model.train()
        return out

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.transition is None:
            return F.cross_entropy(logits, y)
        return forward_corrected_loss(logits, y, self.transition)

    def extras(self) -> dict[str, Any]:
        return {"transition": self.transition}


# -- the paper's label noise ----------------------------------------------------------------


@dataclass
class ReferenceScores:
    """Per-sample losses of a reference network on the samples it was not trained on.

    Attributes:
        losses: cross-entropy of every sample under the reference network ``[n]`` (float64;
            NaN for the reference samples themselves).
        candidates: bool mask ``[n]`` of the scored samples (those that may be flipped).
        accuracy: the reference network's accuracy on the candidates.
    """

    losses: torch.Tensor
    candidates: torch.Tensor
    accuracy: float


def reference_losses(
    model: nn.Module,
    train: Split,
    reference_size: int,
    config: TrainConfig | None = None,
    *,
    seed: int = 0,
) -> ReferenceScores:
    """The paper's noise model, step one: train ``model`` with plain cross-entropy
    (:class:`NaiveTrainer` settings ``config``) on a random ``reference_size`` images of
    ``train`` (the paper: 1,000 of 3,582), then score the other images by their loss.

    Pass the result to :func:`fastinfluence.datasets.flip_labels_by_loss` with
    ``candidates=scores.candidates``: in each class the top-γ loss candidates are flipped.
    The reference images also serve as the loop's validation set (nothing is selected on
    it: the last epoch's model scores).
    """
    from fastinfluence.robust.methods import NaiveTrainer

    x, y = check_split(train, "train")
    if isinstance(reference_size, bool) or not isinstance(reference_size, int) or not (
        1 <= reference_size < len(y)
    ):
        raise ValueError(f"reference_size must be an integer in [1, {len(y)}), got "
                         f"{reference_size!r}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    reference, scored = order[:reference_size], order[reference_size:]
    trainer = NaiveTrainer(model, config)
    result = trainer.fit((x[reference], y[reference]), (x[reference], y[reference]),
                         (x[scored], y[scored]))
    losses = torch.full((len(y),), math.nan, dtype=torch.float64)
    with torch.no_grad():
        trainer.model.eval()
        logits = torch.cat([trainer.model(part.to(trainer.device)).cpu()
                            for part in x[scored].split(trainer.config.eval_batch_size)])
    losses[scored] = F.cross_entropy(logits.double(), y[scored], reduction="none")
    candidates = torch.zeros(len(y), dtype=torch.bool)
    candidates[scored] = True
    return ReferenceScores(losses, candidates, result.final_test_accuracy)


# -- finding the flipped labels -------------------------------------------------------------

DETECTORS = ("loss", "loop", "self_influence", "val_influence")
"""The mislabel rankings of :func:`mislabel_scores`, each "higher = more suspect"."""


def _check_ranking(scores: torch.Tensor, flipped: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    if scores.ndim != 1 or flipped.shape != scores.shape or flipped.dtype != torch.bool:
        raise ValueError(f"scores [n] and a bool mask flipped [n] are needed, got "
                         f"{tuple(scores.shape)} and {flipped.dtype} {tuple(flipped.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf")
    count = int(flipped.sum())
    if not 0 < count < len(flipped):
        raise ValueError(f"flipped must mark some but not all samples, got {count} of "
                         f"{len(flipped)}")
    return scores.detach().cpu().double(), flipped.cpu()


def precision_at_noise_count(scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """Fraction of flipped samples among the ``k`` highest ``scores``, ``k`` = the number of
    flipped samples (so it equals recall at ``k``). Ties at the ``k``-th place count by
    their share of flipped samples (the expectation over random tie-breaking), so integer
    scores such as OUSM's drop counts are not favoured by the data order."""
    scores, flipped = _check_ranking(scores, flipped)
    k = int(flipped.sum())
    threshold = torch.topk(scores, k).values[-1]
    above, tied = scores > threshold, scores == threshold
    slots = k - int(above.sum())
    hits = float(flipped[above].sum()) + slots * float(flipped[tied].double().mean())
    return hits / k


def roc_auc(scores: torch.Tensor, flipped: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for finding the ``flipped`` samples: the
    probability that a random flipped sample scores above a random clean one, ties counted
    1/2 (the Mann–Whitney statistic over mid-ranks)."""
    scores, flipped = _check_ranking(scores, flipped)
    order = torch.argsort(scores, stable=True)
    ordered = scores[order]
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    midranks = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)
    ranks = torch.empty_like(midranks)
    ranks[order] = midranks
    positives = int(flipped.sum())
    negatives = len(flipped) - positives
    return float((ranks[flipped].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def detection_metrics(scores: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """``{"precision": precision_at_noise_count, "auc": roc_auc}`` of one ranking."""
    return {"precision": precision_at_noise_count(scores, flipped),
            "auc": roc_auc(scores, flipped)}


@dataclass
class MislabelScores:
    """Four rankings of the training samples by how likely their label is wrong.

    Attributes:
        scores: by name (:data:`DETECTORS`), ``[n]`` float64, higher = more suspect:
            ``loss`` (cross-entropy of the given label, OUSM's uncertainty), ``loop`` (the
            LoOP outlier probability within the sample's label class, ``1 − λ``),
            ``self_influence`` (``∇l(z)ᵀ(H + λI)^{-1}∇l(z)``) and ``val_influence``
            (``I(z)`` on the clean validation loss, > 0 harmful).
        scoring: the influence computation's ``report.scoring`` (and ``report.path``), e.g.
            ``"head-closed-form"``.
        report: the influence computation's whole report (solver, residual, seconds per
            stage).
    """

    scores: dict[str, torch.Tensor]
    scoring: str
    report: InfluenceReport


def mislabel_scores(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    extent: float = 3.0,
    n_neighbors: int = 10,
    damping: float = 0.01,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> MislabelScores:
    """Score every sample of ``train`` (its labels possibly wrong) with the current
    ``model`` in eval mode: by its loss, its LoOP within its label class on the penultimate
    features (:func:`local_outlier_probability`), its self-influence and its influence on
    the mean loss of the clean ``val`` set, both over the last layer
    (:class:`fastinfluence.Influence` with ``params="last"``: a ResNet's residual adds and
    BatchNorm stay out of θ_S). The model's weights and ``training`` flag are unchanged."""
    x, y = check_split(train, "train")
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    try:
        features, logits = _features_and_outputs(model, x, batch_size, device)
        losses = F.cross_entropy(logits.double(), y, reduction="none")
        outliers = local_outlier_probability(features, y, extent=extent,
                                             n_neighbors=n_neighbors)
        influence = Influence(model, (x, y), check_split(val, "val"), params="last",
                              damping=damping, batch_size=batch_size, device=device)
        harmful = influence.scores().cpu().double()
        self_influence = influence.self_influence().cpu().double()
    finally:
        model.train(was_training)
    scoring = influence.report.scoring
    if influence.report.path != scoring:
        scoring = f"{influence.report.path} path, {scoring} scoring"
    return MislabelScores(
        scores={"loss": losses, "loop": outliers, "self_influence": self_influence,
                "val_influence": harmful},
        scoring=scoring,
        report=influence.report,
    )
