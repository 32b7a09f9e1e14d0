"""Hugging Face ``transformers`` models built offline from tiny configurations — a BERT
sequence classifier and a GPT-2 language model on dict batches (``input_ids``,
``attention_mask``), a ViT image classifier — with ``output=`` picking the logits of their
``ModelOutput``, against the float64 oracle run on single-tensor twins (``Packed``). Skipped
without ``transformers`` (an optional test dependency). K-FAC's factors of their attention
Linears and GPT-2's ``Conv1D`` are checked in tests/hessian/test_kfac.py."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402
from hf_models import classes, images, language_labels, logits, packed_tokens, tokens  # noqa: E402
from test_transformers import oracle_scores  # noqa: E402

import fastinfluence as fi  # noqa: E402
from fastinfluence import reference  # noqa: E402
from fastinfluence.hessian.differentiation import SAMPLE_LOOP_NOTE  # noqa: E402
from fastinfluence.losses import sequence_cross_entropy  # noqa: E402

DAMPING = 2.0  # the exact Hessians' smallest eigenvalues: above −1 (BERT, ViT)
DAMPINGS = {"bert": DAMPING, "vit": DAMPING, "gpt2": 50.0}  # GPT-2's: −37 (summed tokens)
N_TRAIN, N_VAL = 8, 3
CURVATURES_AND_SOLVERS = [
    ("exact", "direct"), ("exact", "cg"), pytest.param("exact", "lissa", marks=pytest.mark.slow),
    ("gauss-newton", "direct"), ("gauss-newton", "cg"), ("gauss-newton", "lissa"),
    ("gauss-newton", "woodbury"),
]


def bert_problem():
    model = hf_models.bert()
    (train_x, train_packed), (val_x, val_packed) = tokens(N_TRAIN, 1), tokens(N_VAL, 2)
    y_train, y_val = classes(N_TRAIN, 3), classes(N_VAL, 4)
    return (model, packed_tokens(model), (train_x, y_train), (val_x, y_val),
            (train_packed, y_train), (val_packed, y_val))


def vit_problem():
    model = hf_models.vit()
    train = images(N_TRAIN, 1), classes(N_TRAIN, 3)
    val = images(N_VAL, 2), classes(N_VAL, 4)
    return model, hf_models.Logits(model), train, val, train, val


def gpt2_problem():
    model = hf_models.gpt2()
    (train_x, train_packed), (val_x, val_packed) = tokens(N_TRAIN, 1), tokens(N_VAL, 2)
    y_train, y_val = language_labels(train_x), language_labels(val_x)
    return (model, packed_tokens(model), (train_x, y_train), (val_x, y_val),
            (train_packed, y_train), (val_packed, y_val))


PROBLEMS = {"bert": bert_problem, "vit": vit_problem, "gpt2": gpt2_problem}
MODULES = {  # a block's attention and feed-forward layers, and the head
    "bert": ["bert.encoder.layer.0.attention.self.query",
             "bert.encoder.layer.0.attention.output.dense",
             "bert.encoder.layer.0.output.LayerNorm", "classifier"],
    "vit": ["vit.layers.0.attention.v_proj", "vit.layers.0.mlp.fc1", "vit.layernorm",
            "classifier"],
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.ln_2", "lm_head"],
}


LAST = {"bert": "classifier", "vit": "classifier", "gpt2": "lm_head"}


def loss_of(name: str):
    return sequence_cross_entropy() if name == "gpt2" else None


def selected(twin, names):
    """The twin's parameters of the modules ``names`` (of the wrapped model)."""
    inner = twin.model.model if hasattr(twin.model, "model") else twin.model
    return [p for name in names for p in inner.get_submodule(name).parameters()]


def check(name, params, hessian, solver):
    model, twin, train, val, packed_train, packed_val = PROBLEMS[name]()
    options = {"tol": 1e-10} if solver in ("cg", "lissa") else {}
    inf = fi.Influence(model, train, val, params=params, hessian=hessian, solver=solver,
                       damping=DAMPINGS[name], output=logits, loss_fn=loss_of(name), **options)
    plist = (list(twin.parameters()) if params == "all" else
             selected(twin, params if isinstance(params, list) else [LAST[name]]))
    expected, s = oracle_scores(twin, packed_train, packed_val, hessian, DAMPINGS[name], plist,
                                loss_of(name))
    tolerance = ({"rtol": 1e-6, "atol": 1e-8} if solver == "lissa"
                 else {"rtol": 1e-8, "atol": 1e-10})
    torch.testing.assert_close(inf.ihvp, s, **tolerance)
    torch.testing.assert_close(inf.scores(), expected, **tolerance)
    return inf


@pytest.mark.parametrize(("hessian", "solver"), CURVATURES_AND_SOLVERS)
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_modules_of_a_block_score_as_the_oracle(name, hessian, solver):
    inf = check(name, MODULES[name], hessian, solver)
    if solver == "woodbury" and name != "vit":  # HF's mask code branches on tensor values
        assert SAMPLE_LOOP_NOTE in inf.report.scoring_reason


@pytest.mark.parametrize("hessian", ["exact", "gauss-newton"])
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_the_last_layer_scores_as_the_oracle(name, hessian):
    """BERT's and ViT's classifier (the closed-form head, through ``output=``), GPT-2's
    ``lm_head`` under the per-sequence loss."""
    inf = check(name, "last", hessian, "direct")
    assert inf.report.path == ("autograd" if name == "gpt2" else "head-closed-form")


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["direct", "cg", "woodbury"])
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2"])
def test_every_parameter_scores_as_the_gauss_newton_oracle(name, solver):
    """``params="all"`` (p = 760–960): the Gauss-Newton oracle costs one backward pass per
    output entry, the exact Hessian's one per parameter (the module lists above test it).
    BERT's word embeddings have ``padding_idx=0``: the direct solver's matrix, built with
    forward-mode products, must leave the padding row as still as autograd does."""
    check(name, "all", "gauss-newton", solver)


def test_self_influence_of_a_padded_batch_runs_sample_by_sample():
    """Per-sample gradients run under ``vmap``, which Hugging Face's attention-mask code
    refuses (it branches on the mask's values): they loop, and the report says so."""
    model, twin, train, val, packed_train, _ = bert_problem()
    inf = fi.Influence(model, train, val, params=MODULES["bert"], hessian="exact",
                       damping=DAMPING, output=logits)
    values = inf.self_influence()
    assert SAMPLE_LOOP_NOTE in inf.report.scoring_reason
    with sdpa_kernel(SDPBackend.MATH):
        expected = reference.self_influence(twin, selected(twin, MODULES["bert"]),
                                            packed_train, DAMPING)
    torch.testing.assert_close(values, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_training_sequences_are_ranked_by_influence_on_a_query_as_the_oracle(reduction):
    """GPT-2's training sequences ordered by their influence on one query sequence's loss
    (summed or averaged over its tokens, padding masked)."""
    model, twin, train, _, packed_train, _ = gpt2_problem()
    query, packed_query = tokens(1, 5)
    labels = language_labels(query)
    loss_fn = sequence_cross_entropy(reduction)
    inf = fi.Influence(model, train, (query, labels), params=MODULES["gpt2"],
                       hessian="gauss-newton", damping=DAMPING, output=logits, loss_fn=loss_fn)
    expected, _ = oracle_scores(twin, packed_train, (packed_query, labels), "gauss-newton",
                                DAMPING, selected(twin, MODULES["gpt2"]), loss_fn)
    scores = inf.scores()
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(scores.argsort(), expected.argsort())
