"""K-FAC and EK-FAC against textbook twins built from per-sample Jacobians, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem, relative_error, transformer_problem
from torch import nn

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.hessian import kfac


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum(dim=1)


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_linear_layer_with_squared_error_is_exact_gauss_newton(hessian, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=bias)).double()
    X = torch.randn(25, 4, dtype=torch.float64)
    Y = torch.randn(25, 3, dtype=torch.float64)
    inf = fi.Influence(model, (X, Y), (X[:6], Y[:6]), params="all", loss_fn=mse,
                       hessian=hessian, damping=0.1)
    assert inf.report.hessian == hessian and inf.report.solver == "direct"
    plist = list(model.parameters())
    matrix = reference.gauss_newton(model, plist, X, Y, loss_fn=mse)
    torch.testing.assert_close(inf.backend.dense(), matrix, rtol=1e-10, atol=1e-12)
    gradient = reference.mean_loss_grad(model, plist, X[:6], Y[:6], loss_fn=mse)
    s = torch.linalg.solve(matrix + 0.1 * torch.eye(len(matrix), dtype=matrix.dtype), gradient)
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-10, atol=1e-12)


class AsIndices(nn.Module):
    """Token ids given as floating-point numbers (as the float64 oracle takes inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_one_embedding_with_squared_error_is_exact_gauss_newton(hessian, padding_idx):
    """An Embedding is a Linear over one-hot inputs (weight ``Wᵀ``): on one position with a
    constant output Hessian its factors are exact; a padding token has no gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(AsIndices(), nn.Embedding(6, 3, padding_idx=padding_idx),
                          nn.Flatten()).double()
    tokens = torch.randint(0, 6, (25, 1)).double()
    Y = torch.randn(25, 3, dtype=torch.float64)
    inf = fi.Influence(model, (tokens, Y), (tokens[:6], Y[:6]), params="all", loss_fn=mse,
                       hessian=hessian, damping=0.1)
    plist = list(model.parameters())
    matrix = reference.gauss_newton(model, plist, tokens, Y, loss_fn=mse)
    torch.testing.assert_close(inf.backend.dense(), matrix, rtol=1e-10, atol=1e-12)
    gradient = reference.mean_loss_grad(model, plist, tokens[:6], Y[:6], loss_fn=mse)
    s = torch.linalg.solve(matrix + 0.1 * torch.eye(len(matrix), dtype=matrix.dtype), gradient)
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-10, atol=1e-12)


def test_layers_without_kfac_factors_are_refused_by_name():
    """The refusal names the layer and quotes the registry's reason."""
    model = nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Flatten(),
                          nn.Linear(24, 3)).double()
    tokens = torch.randint(0, 11, (12, 4), generator=torch.Generator().manual_seed(23))
    data = (tokens, torch.randint(0, 3, (12,)))
    with pytest.raises(ValueError, match=r"the selection also holds \['1.weight', '1.bias'\] "
                                         r"\(LayerNorm '1': its weight scales each feature"):
        fi.Influence(model, data, data, params="all", hessian="kfac")
    signal = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 3)).double()
    data = (torch.randn(12, 1, 10, dtype=torch.float64), torch.randint(0, 3, (12,)))
    with pytest.raises(ValueError, match=r"\(Conv1d '0': K-FAC's factors are implemented for "
                                         r"Conv2d"):
        fi.Influence(signal, data, data, params="all", hessian="ekfac")
    large = nn.Sequential(nn.Embedding(5000, 2), nn.Flatten()).double()
    data = (torch.randint(0, 5000, (12, 1)), torch.randn(12, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"5000 embeddings exceed 4096"):
        fi.Influence(large, data, data, params="all", loss_fn=mse, hessian="kfac")


def layer_jacobians(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    """The layer's input and the Jacobian of the logits w.r.t. its output, for one sample,
    by adding a zero perturbation to the output and differentiating along it."""
    seen = {}

    def keep(_module, inputs, output):
        seen["input"], seen["output"] = inputs[0].detach(), output.detach()

    handle = layer.register_forward_hook(keep)
    logits = model(x[None])[0].detach()
    handle.remove()

    def logits_of(delta):
        shift = layer.register_forward_hook(lambda _m, _i, out: out + delta)
        try:
            return model(x[None])[0]
        finally:
            shift.remove()

    jacobian = torch.autograd.functional.jacobian(logits_of, torch.zeros_like(seen["output"]))
    return seen["input"], jacobian, logits


def out_features(layer: nn.Module) -> int:
    """Output channels: a Linear's or Conv2d's weight is ``[out, ...]``, a Hugging Face
    ``Conv1D``'s ``[in, out]``."""
    return layer.nf if hasattr(layer, "nf") else layer.weight.shape[0]


def kfac_twin(model: nn.Module, layer: nn.Module, X: torch.Tensor, y=None, loss_fn=None):
    """``A = mean_i Σ_t a_it a_itᵀ`` and ``S = mean_i Σ_t B_itᵀ H_i B_it / T`` with the
    softmax-CE output Hessian ``H_i = diag(p_i) − p_i p_iᵀ`` (or, given ``loss_fn`` and ``y``,
    its Hessian in the flattened output, e.g. a language model's ``[T·V]`` logits), sample by
    sample (positions ``t``: a convolution's output pixels, a Linear's sequence positions)."""
    A = S = 0
    for index, x in enumerate(X):
        inputs, jacobian, logits = layer_jacobians(model, layer, x)
        jacobian = jacobian.reshape(logits.numel(), *jacobian.shape[logits.ndim:])
        if loss_fn is None:
            probs = torch.softmax(logits, dim=0)
            curvature = torch.diag(probs) - torch.outer(probs, probs)
        else:
            curvature = torch.autograd.functional.hessian(
                lambda z, index=index, shape=logits.shape: loss_fn(z.reshape(1, *shape),
                                               y[index:index + 1])[0], logits.reshape(-1))
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(inputs, layer.kernel_size, layer.dilation, layer.padding,
                               layer.stride)[0].T
            per_position = jacobian[:, 0].flatten(2).permute(2, 0, 1)  # [T, classes, out]
        else:  # positions T: a Linear on [1, T, features] (a sequence), T = 1 on [1, features]
            patches = inputs.reshape(-1, inputs.shape[-1])
            per_position = jacobian[:, 0].reshape(len(jacobian), -1, out_features(layer))
            per_position = per_position.transpose(0, 1)
        if layer.bias is not None:
            patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=X.dtype)], dim=1)
        A = A + patches.T @ patches
        S = S + sum(b.T @ curvature @ b for b in per_position) / len(per_position)
    return A / len(X), S / len(X)


def flat_order(layer: nn.Module) -> torch.Tensor:
    """Positions of the flat (weight, then bias) parameters in the ``[out, in (+1)]`` matrix
    view, row-major (a ``Conv1D``'s ``[in, out]`` weight is the view's transpose)."""
    out = out_features(layer)
    columns = layer.weight.numel() // out + int(layer.bias is not None)
    index = torch.arange(out * columns).reshape(out, columns)
    weight = index[:, :columns - int(layer.bias is not None)]
    weight = weight.T if hasattr(layer, "nf") else weight
    if layer.bias is None:
        return weight.reshape(-1)
    return torch.cat([weight.reshape(-1), index[:, -1]])


def cnn_problem():
    model, train, val = make_problem("cnn", seed=1, n_train=16, n_val=4)
    return model, train, val, [model[0], model[5]]


def expected_blocks(model, layers, X, y, corrected: bool, loss_fn=None) -> torch.Tensor:
    """The block-diagonal K-FAC (or EK-FAC) matrix in the flat θ_S order."""
    blocks = []
    for layer in layers:
        A, S = kfac_twin(model, layer, X, y, loss_fn)
        order = flat_order(layer)
        kronecker = torch.kron(S, A)[order][:, order]
        if corrected:  # EK-FAC: the exact Gauss-Newton block's variances in K-FAC's eigenbasis
            basis = torch.kron(torch.linalg.eigh(S)[1], torch.linalg.eigh(A)[1])[order]
            exact = reference.gauss_newton(model, list(layer.parameters()), X, y, loss_fn)
            values = torch.diagonal(basis.T @ exact @ basis)
            kronecker = basis @ torch.diag(values) @ basis.T
        blocks.append(kronecker)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_conv_and_linear_factors_match_the_per_sample_twin(hessian, split, monkeypatch):
    """``split``: the factor passes in batches of one sample and the convolution's input
    moments one sample's product at a time (the budgets' smallest pieces)."""
    if split:
        monkeypatch.setattr(kfac, "FACTOR_PASS_BUDGET", 1)
        monkeypatch.setattr(kfac, "MOMENT_BLOCK_BYTES", 1)
    model, train, val, layers = cnn_problem()
    inf = fi.Influence(model, train, val, params=["0", "5"], hessian=hessian, damping=0.05)
    expected = expected_blocks(model, layers, *train, corrected=hessian == "ekfac")
    torch.testing.assert_close(inf.backend.dense(), expected, rtol=1e-8, atol=1e-10)
    gradient = reference.mean_loss_grad(model, [p for m in layers for p in m.parameters()],
                                        *val)
    s = torch.linalg.solve(expected + 0.05 * torch.eye(len(expected), dtype=expected.dtype),
                           gradient)
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-8, atol=1e-10)
    cg = fi.Influence(model, train, val, params=["0", "5"], hessian=hessian, damping=0.05,
                      solver="cg", tol=1e-12)
    torch.testing.assert_close(cg.ihvp, inf.ihvp, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_a_transformers_linear_layers_match_the_per_sample_twin(hessian):
    """The feed-forward Linears run on every sequence position; attention's fused in_proj is
    no Linear, and K-FAC leaves it out (the selection names the Linears)."""
    model, train, val = transformer_problem(n_train=8)
    names = ["encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"]
    layers = [model.get_submodule(name) for name in names]
    inf = fi.Influence(model, train, val, params=names, hessian=hessian, damping=0.05)
    expected = expected_blocks(model, layers, *train, corrected=hessian == "ekfac")
    torch.testing.assert_close(inf.backend.dense(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_a_bert_classifiers_attention_linears_match_the_per_sample_twin(hessian):
    """Hugging Face BERT's query/key/value/output Linears run on every token position."""
    pytest.importorskip("transformers")
    from hf_models import bert, classes, logits, packed_tokens, tokens

    model = bert()
    (x, packed), y = tokens(6, 1), classes(6, 3)
    names = [f"bert.encoder.layer.0.attention.{name}"
             for name in ("self.query", "self.key", "self.value", "output.dense")]
    inf = fi.Influence(model, (x, y), (x, y), params=[*names, "classifier"], hessian=hessian,
                       damping=0.05, output=logits)
    layers = [model.get_submodule(name) for name in [*names, "classifier"]]
    expected = expected_blocks(packed_tokens(model), layers, packed, y,
                               corrected=hessian == "ekfac")
    torch.testing.assert_close(inf.backend.dense(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_gpt2s_conv1d_layers_per_token_match_the_per_sample_twin(hessian):
    """GPT-2's ``Conv1D`` (weight ``[in, out]``) and ``lm_head`` under the per-sequence loss:
    the output Hessian is the loss's in all ``T·V`` logits, positions ``t`` are tokens."""
    pytest.importorskip("transformers")
    from hf_models import gpt2, language_labels, logits, packed_tokens, tokens

    from fastinfluence.losses import sequence_cross_entropy

    model = gpt2()
    x, packed = tokens(4, 1)
    y = language_labels(x)
    loss_fn = sequence_cross_entropy()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
             "transformer.h.0.mlp.c_fc", "lm_head"]
    inf = fi.Influence(model, (x, y), (x, y), params=names, hessian=hessian, damping=0.05,
                       output=logits, loss_fn=loss_fn)
    layers = [model.get_submodule(name) for name in names]
    expected = expected_blocks(packed_tokens(model), layers, packed, y,
                               corrected=hessian == "ekfac", loss_fn=loss_fn)
    torch.testing.assert_close(inf.backend.dense(), expected, rtol=1e-8, atol=1e-10)


def test_hugging_face_layers_kfac_cannot_factor_are_refused_by_name():
    pytest.importorskip("transformers")
    from hf_models import bert, classes, gpt2, language_labels, logits, tokens, vit

    from fastinfluence.losses import sequence_cross_entropy

    x, _ = tokens(4, 1)
    with pytest.raises(ValueError, match=r"\(LayerNorm 'bert.embeddings.LayerNorm': its "):
        fi.Influence(bert(), (x, classes(4, 3)), (x, classes(4, 3)), params="all",
                     hessian="kfac", output=logits)
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"holds \['vit.embeddings.cls_token'.*no K-FAC rule"):
        fi.Influence(vit(), (images, classes(4, 3)), (images, classes(4, 3)), params="all",
                     hessian="ekfac", output=logits)
    y = language_labels(x)
    with pytest.raises(ValueError, match=r"shared between layers \('lm_head' reuses "
                                         r"'transformer.wte.weight'\)"):
        fi.Influence(gpt2(tied=True), (x, y), (x, y), params=["transformer.wte", "lm_head"],
                     hessian="kfac", output=logits, loss_fn=sequence_cross_entropy())


def test_attention_layers_kfac_cannot_factor_are_refused():
    model, train, val = transformer_problem(n_train=6)
    with pytest.raises(ValueError, match="in_proj_weight"):
        fi.Influence(model, train, val, params="all", hessian="kfac")
    # MultiheadAttention reads out_proj's weight without calling it: no hook would see it.
    with pytest.raises(ValueError, match=r"out_proj'\] never ran"):
        fi.Influence(model, train, val, params=["encoder.layers.0.self_attn.out_proj"],
                     hessian="kfac")
    sequence_first, train, val = transformer_problem(n_train=6, batch_first=False)
    with pytest.raises(ValueError, match="samples on the first dimension"):
        fi.Influence(sequence_first, train, val, params=["encoder.layers.0.linear1"],
                     hessian="ekfac")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_correlate_with_exact_gauss_newton_scores(seed):
    """Measured on this problem (seeds 0-2, 48 samples): Pearson 0.93-0.96 at λ = 0.1,
    0.82-0.89 at λ = 0.01, 0.996 at λ = 1; EK-FAC within ±0.01 of K-FAC."""
    model, train, val = make_problem("cnn", seed=seed, n_train=48, n_val=8)
    options = {"params": ["0", "5"], "damping": 0.1}
    exact = fi.Influence(model, train, val, hessian="gauss-newton", solver="direct",
                         **options).scores()
    correlations = {}
    for hessian in ("kfac", "ekfac"):
        scores = fi.Influence(model, train, val, hessian=hessian, **options).scores()
        correlations[hessian] = float(torch.corrcoef(torch.stack([scores, exact]))[0, 1])
    assert min(correlations.values()) > 0.9, correlations


def test_selections_kfac_cannot_factor_are_refused_clearly():
    model, train, val = make_problem("cnn", seed=1)
    with pytest.raises(ValueError, match=r"layers with a K-FAC rule \(Linear, Conv2d"):
        fi.Influence(model, train, val, params="all", hessian="kfac")

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(5, 5)
            self.second = nn.Linear(5, 3)
            self.third = nn.Linear(5, 5)
            self.third.weight = self.first.weight

        def forward(self, x):
            return self.second(self.third(torch.tanh(self.first(x))))

    tied = Tied().double()
    X = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="shared between layers"):
        fi.Influence(tied, (X, y), (X, y), params="all", hessian="ekfac")
    with pytest.raises(ValueError, match="minibatch LiSSA"):
        fi.Influence(model, train, val, params=["5"], loss_fn=lambda z, t: F.cross_entropy(
            z, t, reduction="none"), hessian="kfac", solver="lissa", minibatch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_float32_factors_of_few_samples_decompose(hessian):
    """Fewer samples than a factor's size make it rank-deficient: float32 eigh of the paper
    CNN's factors failed to converge; the factors are decomposed in float64."""
    from fastinfluence.models import PaperCNN

    torch.manual_seed(0)
    model = PaperCNN(image_size=32).eval()
    X, y = torch.rand(24, 1, 32, 32), torch.randint(0, 3, (24,))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    inf = fi.Influence(model, (X, y), (X[:4], y[:4]), params=names, hessian=hessian)
    assert inf.ihvp.dtype == torch.float32
    # the same curvature of the float64 model (K-FAC itself is checked against the exact
    # Gauss-Newton matrix above)
    double = fi.Influence(model.double(), (X.double(), y), (X[:4].double(), y[:4]),
                          params=names, hessian=hessian)
    assert relative_error(inf.scores(), double.scores()) < 1e-3


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_the_head_runs_the_curvature_asked_for(hessian):
    """``params="last"`` takes the closed-form exact Hessian by default; K-FAC named is K-FAC
    (on the network path, which says why), not the exact Hessian in its place."""
    model, train, val, layers = cnn_problem()
    inf = fi.Influence(model, train, val, params="last", hessian=hessian, damping=0.05)
    assert inf.report.hessian == hessian and inf.report.path == "autograd"
    assert f"hessian={hessian!r}" in inf.report.path_reason
    expected = expected_blocks(model, layers[1:], *train, corrected=hessian == "ekfac")
    gradient = reference.mean_loss_grad(model, list(layers[1].parameters()), *val)
    s = torch.linalg.solve(expected + 0.05 * torch.eye(len(expected), dtype=expected.dtype),
                           gradient)
    torch.testing.assert_close(inf.ihvp, s, rtol=1e-8, atol=1e-10)
