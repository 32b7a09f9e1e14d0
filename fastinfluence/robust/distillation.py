"""The MRS paper's methods: data distillation (Algorithm 1), mixing augmentation (Eq. 1),
the noise-augmentation baseline, SVM and random-forest baselines, the paper's metrics, and
influence-based distillation (beyond the paper).

Lu et al., "Human-expert-level brain tumor detection using deep learning with data distillation
and augmentation", §4.2 and §5. Decisions where the
paper is silent (docs/design.md §5):

- **Distillation network = the plain ResCNN.** Algorithm 1's network has "the same structure
  and configuration as the final model" and trains on the noisy training set, which is the
  plain ResCNN baseline; :class:`DistillationTrainer` is that baseline and collects the
  certain samples ``C_E`` along the way (eval mode, at the end of each of the first ``E``
  epochs), so one run gives both.
- **The certainty test** is ``max_c P(c | x_j) ≥ θ`` as written, whatever the predicted
  class; ``require_agreement=True`` adds ``argmax = label`` (the paper's test lets a sample
  the network is sure is of the *other* class into ``C`` with its given label).
- **The final training set is A alone** (the paper's "around 2,000 certain samples ... a
  total of around 10,000 samples with five-fold augmentation" fits ``|A| = 5·|C|``);
  ``include_certain`` in :func:`mix_certain`'s caller adds ``C``.
- **Mixing partners** are drawn uniformly with replacement, never the target itself:
  same class (``"same"``), the other class (``"other"``) or any sample of ``C`` (``"both"``).
- **Class imbalance**: every network's training set is balanced before training. The paper
  cites SMOTE (its reference [29]): ``balancing="smote"`` synthesises minority samples by
  interpolating between a sample and one of its ``k`` nearest same-class neighbours
  (``imbalanced-learn``'s :class:`~imblearn.over_sampling.SMOTE`); ``"random"`` (the default)
  draws minority samples again with replacement; ``"none"`` keeps the set as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.robust.config import TrainConfig, _check_choice, _check_int
from fastinfluence.robust.loop import Split, TestSets, Trainer, TrainResult
from fastinfluence.scoring import Influence

STRATEGIES = ("same", "other", "both")
BALANCING = ("random", "smote", "none")
"""How :class:`BalancedTrainer` balances the classes (:attr:`MRSConfig.balancing`)."""
SMOTE_NEIGHBOURS = 5
"""SMOTE's ``k`` (imbalanced-learn's and Chawla et al.'s default)."""
INFLUENCE_SELECTIONS = ("helpful", "self")


@dataclass
class MRSConfig(TrainConfig):
    """Training of the MRS networks: the shared loop without flips (a spectrum has no mirror
    symmetry), Adam at ``lr=1e-3`` (Adam's default; the paper gives only β₁, β₂), batch 32.

    Attributes:
        balancing: how the training set is class-balanced before training (seeded by
            ``seed``): ``"random"`` draws extra minority-class samples with replacement
            (:func:`oversample_indices`), ``"smote"`` synthesises them (:func:`smote_balance`,
            the paper's reference [29]), ``"none"`` trains on the set as given.
    """

    lr: float = 1e-3
    flip: bool = False
    balancing: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("balancing", self.balancing, BALANCING)


@dataclass
class DistillationConfig(MRSConfig):
    """Algorithm 1's settings.

    Attributes:
        threshold: ``θ``, the certainty threshold on the largest softmax output (paper 0.99).
        distill_epochs: ``max_E``, epochs at whose end certain samples are collected
            (``1 <= max_E <= epochs``; paper 5 by default, 10 in its Fig. 6).
        require_agreement: also require the predicted class to be the given label.
    """

    threshold: float = 0.99
    distill_epochs: int = 5
    require_agreement: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        _check_int("distill_epochs", self.distill_epochs, 1)
        if self.distill_epochs > self.epochs:
            raise ValueError(f"distill_epochs ({self.distill_epochs}) must be <= epochs "
                             f"({self.epochs})")
        if not isinstance(self.require_agreement, bool):
            raise ValueError(f"require_agreement must be a bool, got {self.require_agreement!r}")


def oversample_indices(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of every sample once, plus draws with replacement from each smaller class
    until every class has as many samples as the largest (classes absent stay absent)."""
    counts = torch.bincount(labels)
    parts = [torch.arange(len(labels))]
    for cls, count in enumerate(counts.tolist()):
        if 0 < count < int(counts.max()):
            members = torch.nonzero(labels == cls)[:, 0]
            draws = torch.randint(count, (int(counts.max()) - count,), generator=generator)
            parts.append(members[draws])
    return torch.cat(parts)


def smote_balance(x: torch.Tensor, y: torch.Tensor, seed: int,
                  neighbours: int = SMOTE_NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor]:
    """SMOTE (Chawla et al. 2002): every sample once, then synthetic samples of each smaller
    class until every class has as many as the largest. A synthetic sample is
    ``x_i + u·(x_n − x_i)``, ``u ~ U(0, 1)``, for a random sample ``x_i`` of the class and
    one ``x_n`` of its ``k`` nearest neighbours of the same class (Euclidean, on the
    flattened samples; ``k = min(neighbours, class size − 1)``). Classes absent stay absent.

    Raises:
        ValueError: a class to be enlarged has a single sample (nothing to interpolate with).
    """
    counts = torch.bincount(y)
    present = counts[counts > 0]
    if len(present) < 2 or bool((present == present.max()).all()):
        return x, y
    smallest = int(present.min())
    if smallest < 2:
        raise ValueError("balancing='smote' needs at least 2 samples of each class present "
                         f"(class sizes {counts.tolist()}); use balancing='random'")
    from imblearn.over_sampling import SMOTE

    sampler = SMOTE(k_neighbors=min(neighbours, smallest - 1), random_state=seed)
    flat, labels = sampler.fit_resample(x.reshape(len(x), -1).cpu().numpy(), y.cpu().numpy())
    return (torch.as_tensor(flat, dtype=x.dtype).reshape(len(flat), *x.shape[1:]),
            torch.as_tensor(labels, dtype=y.dtype))


class BalancedTrainer(Trainer):
    """Plain cross-entropy on a class-balanced training set (``config.balancing``): the plain
    ResCNN of the paper, and its final network on ``A``."""

    method = "plain"
    config_type = MRSConfig
    config: MRSConfig

    def fit(self, train: Split, val: Split, test: TestSets) -> TrainResult:
        """Balance ``train`` (``config.balancing``), then train as :meth:`Trainer.fit`."""
        x, y = train
        if self.config.balancing == "random":
            index = oversample_indices(y, self.generator)
            x, y = x[index], y[index]
        elif self.config.balancing == "smote":
            seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
            x, y = smote_balance(x, y, seed)
        return super().fit((x, y), val, test)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode softmax outputs ``[n, classes]`` for inputs ``x`` (on the CPU)."""
        self.model.eval()
        return torch.cat([
            F.softmax(self.model(part.to(self.device)), 1).cpu()
            for part in x.split(self.config.eval_batch_size)
        ])


def certain_samples(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float,
                    require_agreement: bool = False) -> torch.Tensor:
    """Algorithm 1, lines 5–9: sorted indices ``j`` with ``max P(j) ≥ θ`` (and, with
    ``require_agreement``, ``argmax P(j) = label_j``)."""
    confident = probabilities.max(1).values >= threshold
    if require_agreement:
        confident &= probabilities.argmax(1) == labels.to(probabilities.device)
    return torch.nonzero(confident)[:, 0].cpu()


class DistillationTrainer(BalancedTrainer):
    """Data distillation (Algorithm 1) on the plain ResCNN's training run.

    At the end of each of the first ``distill_epochs`` epochs the model (eval mode) scores
    the original, unbalanced training set and :func:`certain_samples` gives ``C_E``;
    :meth:`certain` is the union ``C = C_1 ∪ … ∪ C_E``. The run goes on to ``epochs`` as the
    plain baseline. ``extras["certain_by_epoch"]`` holds every ``C_E`` (index tensors into
    the training set given to :meth:`fit`) and ``extras["probabilities_by_epoch"]`` the
    softmax outputs they were chosen from (``[n, classes]`` per epoch), from which
    :func:`certain_samples` gives ``C_E`` for any other threshold.
    """

    method = "distillation"
    config_type = DistillationConfig
    config: DistillationConfig

    def __init__(self, model: nn.Module, config: DistillationConfig | None = None) -> None:
        super().__init__(model, config)
        self.pool: Split | None = None
        self.certain_by_epoch: list[torch.Tensor] = []
        self.probabilities_by_epoch: list[torch.Tensor] = []

    def fit(self, train: Split, val: Split, test: TestSets) -> TrainResult:
        """Train on ``train`` (balanced), collecting certain samples of ``train`` itself."""
        self.pool = train
        return super().fit(train, val, test)

    def after_epoch(self, epoch: int) -> None:
        if epoch < self.config.distill_epochs:
            assert self.pool is not None
            x, y = self.pool
            probabilities = self.probabilities(x)
            self.probabilities_by_epoch.append(probabilities)
            self.certain_by_epoch.append(certain_samples(
                probabilities, y, self.config.threshold, self.config.require_agreement))

    def certain(self, epochs: int | None = None) -> torch.Tensor:
        """``C`` over the first ``epochs`` collection epochs (default all): sorted indices."""
        epochs = len(self.certain_by_epoch) if epochs is None else epochs
        if not 1 <= epochs <= len(self.certain_by_epoch):
            raise ValueError(f"epochs must lie in [1, {len(self.certain_by_epoch)}], got {epochs}")
        return torch.unique(torch.cat(self.certain_by_epoch[:epochs]))

    def extras(self) -> dict[str, Any]:
        return {"certain_by_epoch": self.certain_by_epoch,
                "probabilities_by_epoch": self.probabilities_by_epoch}


# -- augmentation ------------------------------------------------------------------------------


@dataclass
class MixedSet:
    """An augmented set ``A`` (Eq. 1): ``x = (1 − α)·x_target + α·x_partner``, label of the
    target. ``target`` and ``partner`` index the set the certain samples came from."""

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor
    partner: torch.Tensor
    alpha: float


def mix_certain(x: torch.Tensor, y: torch.Tensor, certain: torch.Tensor, *, strategy: str = "both",
                factor: int = 5, alpha: float = 0.5,
                generator: torch.Generator | None = None) -> MixedSet:
    """Mixing augmentation of the certain samples (§4.2, Eq. 1).

    Every certain sample ``j`` is the target of ``factor`` new samples (``|A| = factor·|C|``,
    the paper's augmentation factor), each mixed with a partner ``k ≠ j`` drawn uniformly from
    ``C``: of the same class (``"same"``), of the other class (``"other"``) or any
    (``"both"``). ``x_A = (1 − α)·x_j + α·x_k`` with the label of ``j``.

    Args:
        x: the samples ``C`` indexes (e.g. the training set).
        y: their labels.
        certain: indices of ``C`` into ``x``.
        strategy: ``"same"``, ``"other"`` or ``"both"``.
        factor: augmentation factor (>= 1).
        alpha: mixing weight ``α`` in [0, 1] (paper 0.5).
        generator: seeds the partners.

    Raises ``ValueError`` when some target has no eligible partner (e.g. ``"other"`` with a
    one-class ``C``).
    """
    _check_choice("strategy", strategy, STRATEGIES)
    _check_int("factor", factor, 1)
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    certain = torch.as_tensor(certain, dtype=torch.int64)
    if len(certain) == 0:
        raise ValueError("no certain samples to mix")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    labels = y[certain]
    targets, partners = [], []
    for position, j in enumerate(certain.tolist()):
        if strategy == "same":
            eligible = labels == labels[position]
        elif strategy == "other":
            eligible = labels != labels[position]
        else:
            eligible = torch.ones(len(certain), dtype=torch.bool)
        eligible[position] = False
        pool = certain[eligible]
        if len(pool) == 0:
            raise ValueError(f"certain sample {j} (class {int(labels[position])}) has no "
                             f"partner for strategy {strategy!r}")
        draws = torch.randint(len(pool), (factor,), generator=generator)
        targets.append(torch.full((factor,), j))
        partners.append(pool[draws])
    target, partner = torch.cat(targets), torch.cat(partners)
    mixed = (1 - alpha) * x[target] + alpha * x[partner]
    return MixedSet(mixed, y[target].clone(), target, partner, float(alpha))


def noise_augment(x: torch.Tensor, y: torch.Tensor, *, factor: int = 1, sigma: float = 0.1,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise-augmentation baseline: the training set plus ``factor`` copies of it with
    white Gaussian noise of standard deviation ``sigma`` added (in the units of ``x``: for
    standardised spectra, a fraction of each spectrum's standard deviation)."""
    _check_int("factor", factor, 1)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    copies = x.repeat(factor, *[1] * (x.ndim - 1))
    noisy = copies + sigma * torch.randn(copies.shape, generator=generator).to(x)
    return torch.cat([x, noisy]), y.repeat(factor + 1)


# -- influence-based distillation --------------------------------------------------------------

INFLUENCE_PARAMS = ("blocks.7.bn2", "fc")
"""The parameters influence is taken over: the last block's second BatchNorm and the dense
layer (514 numbers at width 16): small enough to solve, and before the last residual add, so
scoring runs through the add, the ReLU and the pooling (:class:`fastinfluence.Influence`'s
fused tangent pass) rather than the dense layer's closed form."""


@dataclass
class InfluenceSelection:
    """The certain set chosen by influence, with the scores and how they were computed."""

    certain: torch.Tensor
    scores: torch.Tensor
    scoring: str
    solver: str
    seconds: float


def influence_certain(model: nn.Module, train: Split, clean: Split, count: int, *,
                      selection: str = "helpful",
                      params: tuple[str, ...] | str = INFLUENCE_PARAMS,
                      damping: float = 0.01, solver: str = "cg", batch_size: int = 256,
                      device: str | torch.device | None = None) -> InfluenceSelection:
    """Influence-based distillation: the ``count`` training samples chosen by influence.

    ``"helpful"``: the most helpful samples for a small, confidently labelled set ``clean``
    — the smallest ``I(z) = −∇L(clean)ᵀ H_λ⁻¹ ∇l(z)`` (docs/design.md §1: negative = helpful),
    so samples whose label contradicts what the clean set teaches are left out.
    ``"self"``: the smallest self-influence ``∇l(z)ᵀ H_λ⁻¹ ∇l(z)`` (mislabelled samples are
    hard to fit and have large self-influence); ``clean`` then serves only as the solver's
    required target. The Hessian is the Gauss-Newton matrix of the training loss over
    ``params`` (positive semi-definite, so CG converges), model in eval mode. ``solver`` is
    CG by default: the direct solver's explicit matrix costs one Hessian product per
    parameter, CG a few dozen in all.

    Returns the sorted indices, every sample's score, and which scoring pass ran
    (``report.scoring``) and which solver.
    """
    _check_choice("selection", selection, INFLUENCE_SELECTIONS)
    if not 1 <= count <= len(train[1]):
        raise ValueError(f"count must lie in [1, {len(train[1])}], got {count}")
    params_arg: Any = list(params) if isinstance(params, tuple) else params
    influence = Influence(model, train, clean, params=params_arg, damping=damping,
                          solver=solver, hessian="gauss-newton", batch_size=batch_size,
                          device=device)
    scores = (influence.scores() if selection == "helpful"
              else influence.self_influence()).detach().cpu()
    chosen = torch.sort(torch.argsort(scores, stable=True)[:count]).values
    report = influence.report
    return InfluenceSelection(chosen, scores, report.scoring, report.solve.solver,
                              float(sum(report.seconds.values())))


# -- classical baselines and metrics -----------------------------------------------------------

BASELINES = ("svm", "rf")


def baseline_scores(kind: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    *, seed: int = 0) -> tuple[np.ndarray, float]:
    """Test scores of the paper's classical baselines and the threshold that classifies.

    ``"svm"``: ``sklearn.svm.SVC()`` with its defaults (RBF kernel, C = 1); the score is its
    decision function, threshold 0 (SVC has no probabilities without Platt scaling, which is
    not a default). ``"rf"``: ``RandomForestClassifier(n_estimators=500, criterion="entropy")``;
    the score is the tumour probability, threshold 0.5. Inputs are ``[n, L]`` arrays.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.svm import SVC

    _check_choice("kind", kind, BASELINES)
    if kind == "svm":
        model = SVC().fit(x_train, y_train)
        return model.decision_function(x_test), 0.0
    forest = RandomForestClassifier(n_estimators=500, criterion="entropy", random_state=seed)
    forest.fit(x_train, y_train)
    return forest.predict_proba(x_test)[:, 1], 0.5


def classification_metrics(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor,
                           patient_ids: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The paper's measures on a test set (tumour = positive class 1).

    Spectrum-wise: ``auc`` (area under the ROC curve of ``scores``), ``sensitivity`` =
    TP/(TP + FN), ``specificity`` = TN/(TN + FP) and ``accuracy`` of ``scores ≥ threshold``.
    ``patient_accuracy``: each patient's scores are averaged (the paper averages the class
    probabilities of all a patient's voxels) and compared with ``threshold``; a patient's
    label is the most frequent label of their spectra. NaN where a measure is undefined
    (one class only).
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = scores >= threshold
    positive, negative = labels == 1, labels == 0
    out = {
        "auc": float(roc_auc_score(labels, scores)) if positive.any() and negative.any()
        else math.nan,
        "sensitivity": float(predicted[positive].mean()) if positive.any() else math.nan,
        "specificity": float((~predicted[negative]).mean()) if negative.any() else math.nan,
        "accuracy": float((predicted == positive).mean()),
    }
    patients = np.asarray(patient_ids).astype(str)
    correct = []
    for patient in np.unique(patients):
        member = patients == patient
        label = int(np.bincount(labels[member]).argmax())
        correct.append((scores[member].mean() >= threshold) == bool(label))
    out["patient_accuracy"] = float(np.mean(correct))
    return out
