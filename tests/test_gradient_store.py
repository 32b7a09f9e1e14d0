"""The projected gradient store (docs/design.md §7.4) against the exact Gauss-Newton solve."""

from __future__ import annotations

import pytest
import torch

import fastinfluence as fi
from fastinfluence import gradient_store
from tests.problems import make_problem

PARAMS = {"mlp": "all", "cnn": ["0", "5"]}  # the CNN's BatchNorm has no K-FAC rule


def exact_influence(kind: str, model, train, val) -> fi.Influence:
    return fi.Influence(model, train, val, params=PARAMS[kind], hessian="gauss-newton",
                        solver="direct", damping=0.01)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_orthogonal_projections_reproduce_the_exact_gauss_newton_pairwise_scores(kind, tmp_path):
    model, train, val = make_problem(kind, n_train=20, n_val=4)
    expected = exact_influence(kind, model, train, val).pairwise(val)
    store = fi.GradientStore(model, train, k=64, out=tmp_path, params=PARAMS[kind],
                             damping=0.01, dtype=torch.float64, chunk_size=7).build()
    assert store.dim == sum(layer.module.weight.numel() + layer.module.bias.numel()
                            for layer in store.layers)  # k ≥ every factor: nothing cut
    torch.testing.assert_close(store.pairwise(val), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("largest", [True, False])
def test_streaming_top_k_equals_a_full_sort_and_exact_rescoring_the_full_space(largest, tmp_path):
    model, train, val = make_problem("mlp", n_train=23, n_val=3)
    store = fi.GradientStore(model, train, k=3, out=tmp_path, dtype=torch.float64,
                             chunk_size=4).build()  # k < dims: approximate scores
    scores = store.pairwise(val).T
    ordered = scores.sort(dim=1, descending=largest, stable=True)
    indices, values = store.top_influences(val, top=6, largest=largest)
    assert torch.equal(indices, ordered.indices[:, :6])
    torch.testing.assert_close(values, ordered.values[:, :6], rtol=1e-12, atol=1e-12)

    influence = exact_influence("mlp", model, train, val)
    exact = influence.pairwise(val).T
    torch.testing.assert_close(influence.pairwise(val, rows=torch.tensor([5, 2])).T,
                               exact[:, [5, 2]])
    with pytest.raises(ValueError, match="rows="):
        influence.pairwise(val, rows=torch.tensor([1]), out=tmp_path / "pairwise")
    rescored_indices, rescored = store.top_influences(val, top=6, largest=largest,
                                                      exact=influence)
    assert torch.equal(rescored_indices.sort(dim=1).values, indices.sort(dim=1).values)
    torch.testing.assert_close(rescored, exact.gather(1, rescored_indices))
    sign = 1 if largest else -1
    assert bool((sign * rescored.diff(dim=1) <= 0).all())


def test_a_killed_build_resumes_to_identical_chunks(tmp_path, monkeypatch):
    model, train, _ = make_problem("cnn", n_train=17)
    options = dict(k=4, params=PARAMS["cnn"], chunk_size=5, seed=3)
    gradient_store.GradientStore(model, train, out=tmp_path / "whole", **options).build()

    project = gradient_store.GradientStore._project
    calls = []

    def killed_at_the_third_chunk(self, data, columns):
        calls.append(len(data))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return project(self, data, columns)

    monkeypatch.setattr(gradient_store.GradientStore, "_project", killed_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        gradient_store.GradientStore(model, train, out=tmp_path / "resumed", **options).build()
    calls.clear()
    fi.GradientStore(model, train, out=tmp_path / "resumed", **options).build()
    assert calls == [5, 2]  # chunks 2 and 3 only
    whole = sorted(p.name for p in (tmp_path / "whole").glob("projected-*.npy"))
    assert whole == sorted(p.name for p in (tmp_path / "resumed").glob("projected-*.npy"))
    assert len(whole) == 8
    for name in whole:
        resumed = (tmp_path / "resumed" / name).read_bytes()
        assert (tmp_path / "whole" / name).read_bytes() == resumed


def test_float16_storage_and_refusals(tmp_path):
    model, train, val = make_problem("cnn", n_train=12, n_val=2)
    with pytest.raises(ValueError, match=r"BatchNorm2d '1'") as refused:
        fi.GradientStore(model, train, k=4, out=tmp_path / "a")
    assert "hessian=" not in str(refused.value)  # the store takes no hessian option
    with pytest.raises(ValueError, match="k must be a positive int"):
        fi.GradientStore(model, train, k=0, out=tmp_path / "b", params=PARAMS["cnn"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        fi.StoreConfig(k=4, dtype=torch.int8)
    store = fi.GradientStore(model, train, k=4, out=tmp_path / "c", params=PARAMS["cnn"],
                             dtype=torch.float16)
    with pytest.raises(ValueError, match="call build"):
        store.pairwise(val)
    half = store.build().pairwise(val)
    wide = fi.GradientStore(model, train, k=4, out=tmp_path / "d", params=PARAMS["cnn"],
                            dtype=torch.float64).build().pairwise(val)
    assert float((half - wide).norm() / wide.norm()) < 1e-2
    with pytest.raises(ValueError, match="top must be"):
        store.top_influences(val, top=13)


@pytest.mark.parametrize("options", [dict(), dict(stride=2, padding=1),
                                     dict(stride=(1, 2), padding=(2, 0), dilation=2)],
                         ids=["plain", "strided-padded", "dilated"])
def test_a_convolution_projects_its_patches_without_unfolding_them(options):
    from fastinfluence.layers.registry import KroneckerRule, kfac_rule

    conv = torch.nn.Conv2d(3, 5, (3, 2), **options).double()
    rule = kfac_rule(conv)[1]
    x = torch.randn(4, 3, 9, 8, dtype=torch.float64)
    projection = torch.randn(6, 3 * 3 * 2, dtype=torch.float64)
    expected = KroneckerRule.projected_patches(rule, conv, x, projection)  # through patches
    torch.testing.assert_close(rule.projected_patches(conv, x, projection), expected,
                               rtol=1e-12, atol=1e-12)
