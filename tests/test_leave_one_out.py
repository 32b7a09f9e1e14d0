"""Influence predicts real leave-one-out retraining (Koh & Liang 2017, Fig. 2).

L2-regularised softmax regression on scikit-learn's breast-cancer data (569 real tumours, 30
features). The training objective is ``(1/n) Σ_i l_i + (λ/2)‖θ‖²``, whose Hessian is exactly
``H + λI``: the influence with ``damping=λ`` is then the exact first-order prediction, and
removing sample ``z`` (keeping the 1/n weight of the others) changes the validation loss by
about ``−I(z)/n``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn

import fastinfluence as fi

L2 = 0.01


def objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """``(1/n) Σ_i l_i + (λ/2)‖θ‖²`` for a flat ``θ = [W (2×30), b (2)]``."""
    weight, bias = theta[:60].reshape(2, 30), theta[60:]
    losses = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") / n
    return losses + L2 / 2 * (theta * theta).sum()


def fit(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """Newton's method to machine precision (the objective is strongly convex)."""
    for _ in range(50):
        gradient = torch.func.grad(objective)(theta, x, y, n)
        if float(gradient.norm()) < 1e-13:
            return theta
        hessian = torch.func.hessian(objective)(theta, x, y, n)
        theta = theta - torch.linalg.solve(hessian, gradient)
    raise AssertionError("Newton's method did not converge")


def test_influence_predicts_leave_one_out_retraining():
    data = load_breast_cancer()
    features = (data.data - data.data.mean(0)) / data.data.std(0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(features))
    x = torch.tensor(features[order], dtype=torch.float64)
    y = torch.tensor(data.target[order], dtype=torch.int64)
    x_train, y_train, x_val, y_val = x[:300], y[:300], x[300:450], y[300:450]
    n = len(x_train)

    theta = fit(torch.zeros(62, dtype=torch.float64), x_train, y_train, n)
    model = nn.Linear(30, 2).double()
    with torch.no_grad():
        model.weight.copy_(theta[:60].reshape(2, 30))
        model.bias.copy_(theta[60:])
        base_loss = float(F.cross_entropy(model(x_val), y_val))

    scores = fi.score(model, (x_train, y_train), (x_val, y_val), damping=L2, solver="direct")
    predicted = -scores / n

    # The 20 most influential samples either way, and 20 at random.
    ranked = torch.argsort(scores)
    chosen = torch.unique(torch.cat([ranked[:20], ranked[-20:],
                                     torch.as_tensor(rng.choice(n, 20, replace=False))]))
    actual = []
    for index in chosen.tolist():
        keep = torch.ones(n, dtype=torch.bool)
        keep[index] = False
        refit = fit(theta, x_train[keep], y_train[keep], n)
        val_loss = objective(refit, x_val, y_val, len(x_val)) - L2 / 2 * (refit * refit).sum()
        actual.append(float(val_loss) - base_loss)
    actual = torch.tensor(actual, dtype=torch.float64)
    pearson = float(torch.corrcoef(torch.stack([predicted[chosen], actual]))[0, 1])
    assert pearson >= 0.95, f"Pearson {pearson:.4f} between predicted and actual"
    # The scale matches too, not only the ranking.
    slope = float((predicted[chosen] * actual).sum() / (predicted[chosen] ** 2).sum())
    assert 0.8 < slope < 1.25, f"actual ≈ {slope:.3f} × predicted"
