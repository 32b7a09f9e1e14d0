"""An ``nn.Embedding`` with ``padding_idx`` in θ_S: autograd gives its padding row no gradient
(the module's definition, and the oracle's), so every pass of the engine — forward mode
included — must leave that row still: each curvature's matrix has zero padding rows and
columns, and every solver and score agrees with the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.functional import ConstantPaddingRows

DAMPING = 0.5
VOCABULARY, WIDTH, LENGTH = 6, 3, 4


class AsIndices(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


class MeanEmbedding(nn.Module):
    """Token ids ``[batch, LENGTH]`` (as floating-point numbers, which the float64 oracle
    takes) → ``Embedding(padding_idx)`` → mean over positions →
    Linear; with ``tied`` the head is ``Linear(WIDTH, VOCABULARY)`` sharing the embedding's
    weight (a language model's decoder), so the padding row has a gradient through it."""

    def __init__(self, padding_idx: int, tied: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx)
        self.head = nn.Linear(WIDTH, VOCABULARY if tied else 3)
        if tied:
            self.head.weight = self.embedding.weight
        with torch.no_grad():  # a padding row of non-zero values: they are still read
            self.embedding.weight[padding_idx] = torch.tensor([0.3, -0.2, 0.5])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens.long()).mean(dim=1))


def padding_problem(padding_idx: int = 0, tied: bool = False):
    """A float64 :class:`MeanEmbedding` and ``(tokens, labels)`` train and val sets in which
    most sequences hold padding."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = MeanEmbedding(padding_idx, tied).double().eval()
    classes = VOCABULARY if tied else 3

    def data(n: int):
        tokens = torch.randint(0, VOCABULARY, (n, LENGTH), generator=generator).double()
        return tokens, torch.randint(0, classes, (n,), generator=generator)

    return model, data(16), data(5)


def oracle_matrix(model: nn.Module, train, curvature: str) -> torch.Tensor:
    plist = list(model.parameters())
    return (reference.hessian if curvature == "exact" else reference.gauss_newton)(
        model, plist, *train)


def padding_entries(model: MeanEmbedding) -> torch.Tensor:
    """Where the padding row sits in the flat θ (the embedding's weight comes first)."""
    row = model.embedding.padding_idx % VOCABULARY
    return torch.arange(row * WIDTH, (row + 1) * WIDTH)


@pytest.mark.parametrize("padding_idx", [0, -1])
@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_the_curvature_has_zero_padding_rows_and_columns_as_the_oracle(hessian, padding_idx):
    model, train, val = padding_problem(padding_idx)
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, damping=DAMPING)
    assert inf.report.scoring == "torch.func.jvp"  # the fused pass leaves padding_idx to jvp
    dense = inf.backend.dense()
    padding = padding_entries(model)
    assert not dense[padding].any() and not dense[:, padding].any()
    torch.testing.assert_close(dense, oracle_matrix(model, train, hessian), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize(("hessian", "solver"), [
    ("exact", "direct"), ("exact", "cg"), ("exact", "lissa"),
    ("gauss-newton", "direct"), ("gauss-newton", "cg"), ("gauss-newton", "lissa"),
    ("gauss-newton", "woodbury"),
])
def test_every_solver_scores_as_the_oracle(hessian, solver):
    model, train, val = padding_problem()
    options = {"tol": 1e-11} if solver in ("cg", "lissa") else {}
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, solver=solver,
                       damping=DAMPING, **options)
    plist = list(model.parameters())
    s = reference.ihvp_direct(oracle_matrix(model, train, hessian),
                              reference.mean_loss_grad(model, plist, *val), DAMPING)
    tolerance = {"rtol": 1e-7, "atol": 1e-9} if solver == "lissa" else {"rtol": 1e-9,
                                                                        "atol": 1e-11}
    assert not s[padding_entries(model)].any()
    torch.testing.assert_close(inf.ihvp, s, **tolerance)
    expected = -(reference.per_sample_grads(model, plist, *train) @ s)
    torch.testing.assert_close(inf.scores(), expected, **tolerance)


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_self_influence_and_pairwise_as_the_oracle(hessian):
    model, train, val = padding_problem()
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, damping=DAMPING)
    plist = list(model.parameters())
    matrix = oracle_matrix(model, train, hessian)
    gradients = reference.per_sample_grads(model, plist, *train)
    test_gradients = reference.per_sample_grads(model, plist, *val)
    solved = reference.ihvp_direct(matrix, gradients.T, DAMPING)  # [p, n]
    torch.testing.assert_close(inf.self_influence(), (gradients * solved.T).sum(dim=1),
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inf.pairwise(val), -(solved.T @ test_gradients.T),
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_kronecker_factors_leave_the_padding_row_out(hessian):
    """K-FAC's Embedding rule zeroes a padding token's one-hot: the padding rows and columns
    of its matrix are zero, as the Gauss-Newton oracle's, and scores use that matrix."""
    model, train, val = padding_problem()
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, damping=DAMPING)
    dense, padding = inf.backend.dense(), padding_entries(model)
    assert not dense[padding].any() and not dense[:, padding].any()
    assert not oracle_matrix(model, train, "gauss-newton")[padding].any()
    plist = list(model.parameters())
    gradients = reference.per_sample_grads(model, plist, *train)
    s = reference.ihvp_direct(dense, reference.mean_loss_grad(model, plist, *val), DAMPING)
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inf.scores(), -(gradients @ s), rtol=1e-9, atol=1e-11)
    solved = reference.ihvp_direct(dense, gradients.T, DAMPING)
    torch.testing.assert_close(inf.self_influence(), (gradients * solved.T).sum(dim=1),
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
def test_a_padding_row_tied_to_a_decoder_keeps_the_decoder_s_derivative(hessian):
    """Only the embedding's reads of the padding row are constant: the same weight as the
    head's matrix moves the logits, so the row has curvature there, as in the oracle."""
    model, train, val = padding_problem(tied=True)
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, damping=DAMPING)
    matrix = oracle_matrix(model, train, hessian)
    assert matrix[padding_entries(model)].abs().amax() > 1e-3
    torch.testing.assert_close(inf.backend.dense(), matrix, rtol=1e-10, atol=1e-12)
    plist = list(model.parameters())
    s = reference.ihvp_direct(matrix, reference.mean_loss_grad(model, plist, *val), DAMPING)
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-9, atol=1e-11)


def test_padding_positions_keep_their_values_and_lose_only_forward_derivatives():
    """Under :class:`ConstantPaddingRows` the output is unchanged and ``jvp`` along the padding
    row is zero; a model without such an Embedding runs without the mode."""
    model, (numbers, _), _ = padding_problem()
    tokens = numbers.long()
    weight = model.embedding.weight.detach()
    direction = torch.zeros_like(weight)
    direction[0] = 1.0

    def embedded(w: torch.Tensor) -> torch.Tensor:
        with ConstantPaddingRows():
            return torch.nn.functional.embedding(tokens, w, padding_idx=0)

    values, tangent = torch.func.jvp(embedded, (weight,), (direction,))
    torch.testing.assert_close(values, weight[tokens])
    assert not tangent.any()
    targets = torch.randn(16, LENGTH * WIDTH, dtype=torch.float64)
    plain = fi.Influence(nn.Sequential(AsIndices(), nn.Embedding(6, 3), nn.Flatten()).double(),
                         (numbers, targets), (numbers, targets), params="all",
                         loss_fn=lambda out, y: ((out - y) ** 2).sum(dim=1))
    assert plain.backend.fmodel.padding_embeddings == []
