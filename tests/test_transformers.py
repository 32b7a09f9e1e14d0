"""Transformers: attention's fused kernels and torch's inference fast paths have no forward-mode
or second derivatives, so every derivative pass runs attention on SDPA's math kernel with the
fast paths off (``fastinfluence.functional.differentiable_attention``), said in the report;
every curvature and solver against the float64 oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from problems import Packed, transformer_problem
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastinfluence as fi
from fastinfluence import reference

DAMPING = 1.0


def oracle_scores(model: nn.Module, train, val, curvature: str, damping: float = DAMPING,
                  plist=None, loss_fn=None):
    """``−∇l(z)ᵀ(C + λI)⁻¹∇L(val)`` with ``C`` the explicit Hessian or Gauss-Newton matrix
    of ``plist`` (default: every parameter) (double backward needs SDPA's math kernel, which
    the oracle names itself)."""
    plist = list(model.parameters()) if plist is None else plist
    with sdpa_kernel(SDPBackend.MATH):
        matrix = (reference.hessian if curvature == "exact" else reference.gauss_newton)(
            model, plist, *train, loss_fn=loss_fn)
    s = reference.ihvp_direct(matrix, reference.mean_loss_grad(model, plist, *val, loss_fn),
                              damping)
    return -(reference.per_sample_grads(model, plist, *train, loss_fn) @ s), s


@pytest.mark.parametrize(("hessian", "solver"), [
    ("exact", "direct"), ("exact", "cg"), ("exact", "lissa"),
    ("gauss-newton", "direct"), ("gauss-newton", "cg"), ("gauss-newton", "lissa"),
    ("gauss-newton", "woodbury"),
])
def test_a_transformer_encoder_scores_as_the_oracle(hessian, solver):
    model, train, val = transformer_problem()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    options = {"tol": 1e-10} if solver in ("cg", "lissa") else {}
    inf = fi.Influence(model, train, val, params="all", hessian=hessian, solver=solver,
                       damping=DAMPING, **options)
    assert inf.report.scoring == "torch.func.jvp"
    assert "math kernel" in inf.report.scoring_reason
    assert torch.backends.mha.get_fastpath_enabled() == fast_path  # restored
    expected, s = oracle_scores(model, train, val, hessian)
    tolerance = {"rtol": 1e-6, "atol": 1e-8} if solver == "lissa" else {"rtol": 1e-9,
                                                                        "atol": 1e-11}
    torch.testing.assert_close(inf.ihvp, s, **tolerance)
    torch.testing.assert_close(inf.scores(), expected, **tolerance)


def test_perturbation_and_self_influence_of_a_transformer():
    model, train, val = transformer_problem()
    inf = fi.Influence(model, train, val, params="all", hessian="exact", damping=DAMPING)
    plist = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        expected = reference.perturbation_influence(model, plist, *train, inf.ihvp)
        self_influence = reference.self_influence(model, plist, train, DAMPING)
    torch.testing.assert_close(inf.perturbation(*train), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inf.self_influence(), self_influence, rtol=1e-9, atol=1e-11)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` called directly (``need_weights`` at its default): its eval
    fast path is ``torch._native_multi_head_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x)[0].mean(dim=1))


def test_multihead_attention_in_eval_mode_under_every_transform():
    _, train, val = transformer_problem(seed=1)
    torch.manual_seed(1)
    model = Attention().double().eval()
    expected, _ = oracle_scores(model, train, val, "gauss-newton")
    for solver in ("direct", "woodbury"):
        inf = fi.Influence(model, train, val, params="all", solver=solver, damping=DAMPING)
        torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)


def test_a_padded_batch_of_the_nested_tensor_fast_path_scores_as_the_oracle():
    """``model(x, padding_mask)`` in eval mode: without gradients ``nn.TransformerEncoder``
    would run ``_transformer_encoder_layer_fwd`` on nested tensors."""
    model, (x, y), (x_val, y_val) = transformer_problem(seed=2, length=4)
    mask = torch.zeros(len(x), 4, dtype=torch.bool)
    mask[::2, 3] = True
    mask[::3, 2:] = True
    val_mask = torch.zeros(len(x_val), 4, dtype=torch.bool)
    val_mask[0, 1:] = True
    inf = fi.Influence(model, ((x, mask), y), ((x_val, val_mask), y_val), params="all",
                       hessian="exact", damping=DAMPING)
    packed = Packed(model, lambda X: ((X[:, :16].reshape(-1, 4, 4), X[:, 16:].bool()), {}))

    def pack(inputs, mask):
        return torch.cat([inputs.flatten(1), mask.double()], dim=1)

    expected, _ = oracle_scores(packed, (pack(x, mask), y), (pack(x_val, val_mask), y_val),
                                "exact")
    torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)


class RecurrentAttention(nn.Module):
    """An LSTM (in float32 torch's CPU kernel has no forward-mode derivative), then a
    transformer layer: Gauss-Newton products in reverse mode differentiate attention twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.lstm(x)[0]).mean(dim=1))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_the_reverse_mode_fallback_differentiates_attention_twice():
    _, (x, y), (x_val, y_val) = transformer_problem(seed=3, n_train=10)
    torch.manual_seed(3)
    model = RecurrentAttention().eval()
    train, val = (x.float(), y), (x_val.float(), y_val)
    inf = fi.Influence(model, train, val, params="all", damping=DAMPING)
    assert inf.report.scoring == "reverse-mode"
    assert "forward-mode" in inf.report.scoring_reason
    assert "math kernel" in inf.report.scoring_reason
    twin = copy.deepcopy(model).double()
    expected, s = oracle_scores(twin, (x, y), (x_val, y_val), "gauss-newton")
    torch.testing.assert_close(inf.ihvp.double(), s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(inf.scores().double(), expected, rtol=1e-4, atol=1e-6)
