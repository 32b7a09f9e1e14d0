"""The ISR/ISP paper's training methods: Naive, AT, ISR (Algorithm 1), ISP (Algorithm 2).

Influence conventions (docs/design.md §1): ``I(z) = −∇L(D_val)ᵀ H_λ^{-1} ∇l(z)``, positive =
harmful; ``I_pert(z) = −∇_x(sᵀ∇_θ l(z))`` with ``s = H_λ^{-1}∇L(D_val)``. Both over the final
Linear layer, model in eval mode, validation set clean (docs/design.md §5).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.robust.config import (
    EMPHASES,
    SELECTIONS,
    ATConfig,
    InfluenceConfig,
    InfluenceRemovalConfig,
    ISPConfig,
    ISRConfig,
    TrainConfig,
)
from fastinfluence.robust.loop import Trainer
from fastinfluence.scoring import Influence


class NaiveTrainer(Trainer):
    """The paper's "Naive" baseline: plain cross-entropy, ``min_θ L(D_trn, θ)``."""

    method = "naive"
    config_type = TrainConfig


# -- adversarial training ---------------------------------------------------------------


def fgsm_uniform(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    alpha: float,
    generator: torch.Generator,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """FGSM with uniform initialisation (Wong et al. 2020); returns ``x + δ``.

    ``δ ~ U(−ε, ε)``, ``δ ← clip(δ + α·sign ∇_δ l(x + δ), −ε, ε)``; after both steps ``δ`` is
    clipped so that ``x + δ`` stays in ``bounds``. Since ``x`` lies in ``bounds``, ``|δ| ≤ ε``
    holds throughout. The gradient is taken in the model's current mode (train mode during
    training, as in Wong et al.).

    Args:
        model: the classifier.
        x: clean images, inside ``bounds``.
        y: labels.
        epsilon: ``ε > 0``, the L∞ radius.
        alpha: ``α > 0``, the step.
        generator: CPU generator of the uniform initialisation.
        bounds: the valid intensity range.
    """
    low, high = bounds
    start = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x) * epsilon
    delta = torch.clamp(start, low - x, high - x).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (gradient,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + alpha * gradient.sign()).clamp(-epsilon, epsilon)
    return (x + torch.clamp(delta, low - x, high - x)).detach()


class ATTrainer(Trainer):
    """Adversarial training: every batch is replaced by its FGSM-uniform adversarial version
    (:func:`fgsm_uniform`) and the model minimises ``CE(f(x + δ), y)`` only."""

    method = "at"
    config_type = ATConfig
    config: ATConfig

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        adversarial = fgsm_uniform(
            self.model, x, y, self.config.epsilon, self.config.alpha, self.generator
        )
        return F.cross_entropy(self.model(adversarial), y)


# -- influence-based methods ------------------------------------------------------------


def influence_weights(
    scores: torch.Tensor, max_weight: float = 2.0, emphasis: str = "helpful"
) -> torch.Tensor:
    """ISR sample weights (Algorithm 1, lines 4–7): influence min-max scaled to ``[1, m]``.

    With ``v = −I`` (``emphasis="helpful"``, Algorithm 1) or ``v = I`` (``"harmful"``, the
    §4.2 prose), ``w_i = 1 + (m − 1)(v_i − min v)/(max v − min v)``: the most helpful
    (respectively harmful) sample gets ``m``, the other end ``1``. All weights are 1 when the
    scores are all equal.

    Args:
        scores: ``I(z_i)`` of every training sample, ``[n]`` (positive = harmful).
        max_weight: ``m >= 1``.
        emphasis: ``"helpful"`` or ``"harmful"``.
    """
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {EMPHASES}, got {emphasis!r}")
    if not max_weight >= 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight!r}")
    values = (-scores if emphasis == "helpful" else scores).double()
    span = values.max() - values.min()
    if span == 0:
        return torch.ones_like(scores)
    return (1 + (max_weight - 1) * (values - values.min()) / span).to(scores.dtype)


def num_selected(ratio: float, n: int) -> int:
    """``⌈r·n⌉``, computed on the decimal ``r`` as written: ``⌈0.07 × 100⌉`` is 7 here, where
    the floating-point product (7.000000000000001) would give 8."""
    return math.ceil(Fraction(repr(float(ratio))) * n)


def select_influential(
    scores: torch.Tensor, ratio: float = 0.1, selection: str = "helpful"
) -> torch.Tensor:
    """ISP's subset ``D_s`` (Algorithm 2, lines 4–9): indices of ``⌈r·n⌉`` samples.

    ``"helpful"``: the first ``⌈r·n⌉`` in ascending order of ``I`` (most negative, Algorithm 2);
    ``"harmful"``: the largest ``I`` (the §5.2 prose). Ties keep the data order.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
    order = torch.argsort(scores, descending=selection == "harmful", stable=True)
    return order[: num_selected(ratio, len(scores))]


class _InfluenceTrainer(Trainer):
    """Computes influence once, before epoch ``T_pre`` (i.e. after ``T_pre`` epochs)."""

    config: InfluenceConfig

    def __init__(self, model: nn.Module, config: InfluenceConfig | None = None) -> None:
        super().__init__(model, config)
        self.scores: torch.Tensor | None = None
        self.scoring: str | None = None

    def before_epoch(self, epoch: int) -> None:
        if epoch == self.config.pretrain_epochs:
            influence = self.influence()
            self.scores = influence.scores().cpu()
            self.scoring = influence.report.scoring
            self.apply(influence)

    def influence(self) -> Influence:
        """:class:`fastinfluence.Influence` over the final Linear layer of the current model,
        Hessian of the (un-augmented) training loss, target the validation loss."""
        assert self.train_data is not None and self.val_data is not None
        return Influence(
            self.model, self.train_data, self.val_data, params="last",
            damping=self.config.damping, solver=self.config.solver,
            batch_size=self.config.eval_batch_size, device=self.device,
            progress=self.config.progress,
        )

    def apply(self, influence: Influence) -> None:
        """Use the influence (``self.scores`` is set) for the remaining epochs."""
        raise NotImplementedError


class ISRTrainer(_InfluenceTrainer):
    """Influence-based Sample Reweighting (Algorithm 1).

    ``T_pre`` epochs of plain cross-entropy; then ``I(z_i)`` (Eq. 7) of every training sample
    gives weights ``w`` (:func:`influence_weights`, most helpful → ``m`` by default) and the
    remaining epochs minimise Eq. 9 on each batch: ``(1/|B|) Σ_{i∈B} w_i l(z_i, θ)``.
    After :meth:`fit`, ``scores`` and ``weights`` hold ``I`` and ``w``.
    """

    method = "isr"
    config_type = ISRConfig
    config: ISRConfig

    def __init__(self, model: nn.Module, config: ISRConfig | None = None) -> None:
        super().__init__(model, config)
        self.weights: torch.Tensor | None = None

    def apply(self, influence: Influence) -> None:
        assert self.scores is not None
        self.weights = influence_weights(
            self.scores, self.config.max_weight, self.config.emphasis
        ).float()

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        if self.weights is None:
            return losses.mean()
        return (self.weights[index].to(losses) * losses).mean()

    def extras(self) -> dict[str, Any]:
        return {"scores": self.scores, "weights": self.weights, "scoring": self.scoring}


class InfluenceRemovalTrainer(_InfluenceTrainer):
    """Influence-based removal: ``T_pre`` epochs of plain cross-entropy, then the
    ``⌈r·n⌉`` most harmful training samples (largest ``I(z_i)``, :func:`select_influential`
    with ``"harmful"``: those whose up-weighting raises the clean validation loss the most,
    e.g. flipped labels) are removed and the remaining epochs train on the rest with the
    same model and optimiser. After :meth:`fit`, ``scores`` and ``removed`` (indices into
    the original training set) are available, also in ``extras``.
    """

    method = "influence_removal"
    config_type = InfluenceRemovalConfig
    config: InfluenceRemovalConfig

    def __init__(self, model: nn.Module, config: InfluenceRemovalConfig | None = None) -> None:
        super().__init__(model, config)
        self.removed: torch.Tensor | None = None

    def apply(self, influence: Influence) -> None:
        assert self.scores is not None and self.train_data is not None
        x, y = self.train_data
        removed = select_influential(self.scores, self.config.ratio, "harmful")
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[removed] = False
        self.removed = removed
        self.train_data = (x[keep], y[keep])

    def extras(self) -> dict[str, Any]:
        return {"scores": self.scores, "removed": self.removed, "scoring": self.scoring}


class ISPTrainer(_InfluenceTrainer):
    """Influence-based Sample Perturbation (Algorithm 2).

    ``T_pre`` epochs of plain cross-entropy; then the ``⌈r·n⌉`` samples chosen by
    :func:`select_influential` (most helpful by default) are replaced, once, by
    ``x̂_i = clip(x_i + δ_i)`` with ``δ_i = −γ·I_pert(z_i)`` (Eq. 8) — the step that lowers the
    validation loss to first order — kept as float; training goes on with the same model and
    optimiser on the perturbed set. After :meth:`fit`, ``scores``, ``selected`` (indices) and
    ``train_data`` (the perturbed training set) are available; ``extras`` holds the applied
    ``delta`` of the selected samples (after clipping).
    """

    method = "isp"
    config_type = ISPConfig
    config: ISPConfig

    def __init__(self, model: nn.Module, config: ISPConfig | None = None) -> None:
        super().__init__(model, config)
        self.selected: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    def apply(self, influence: Influence) -> None:
        assert self.scores is not None and self.train_data is not None
        x, y = self.train_data
        selected = select_influential(self.scores, self.config.ratio, self.config.selection)
        maps = influence.perturbation(x[selected], y[selected]).to(x)
        low, high = self.config.clip
        perturbed = (x[selected] - self.config.gamma * maps).clamp(low, high)
        self.delta = perturbed - x[selected]
        self.selected = selected
        x = x.clone()
        x[selected] = perturbed
        self.train_data = (x, y)

    def extras(self) -> dict[str, Any]:
        return {"scores": self.scores, "selected": self.selected, "delta": self.delta,
                "scoring": self.scoring}
