"""Smoke tests of ``bench_peers_gpt2.py``: the ``Conv1D`` → ``nn.Linear`` rewrite that
Kronfluence needs is the same map, and the whole script runs on the tiniest settings where
Kronfluence is installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")
from bench_peers_gpt2 import conv1d_as_linear, layer_names, load_example, main  # noqa: E402


def test_conv1d_as_linear_is_the_same_model():
    example = load_example()
    settings = example.Settings(n_train=1, n_queries=1, context=8, layers=1, width=8, epochs=1,
                                lr=1e-3, params="attention-mlp", damping=0.1, cg_iterations=1,
                                top=1, seed=0)
    model = example.build_model(settings).eval()
    rewritten = conv1d_as_linear(model)
    ids = torch.randint(0, example.VOCABULARY, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rewritten(ids).logits, model(ids).logits)
    assert all(isinstance(rewritten.get_submodule(name), torch.nn.Linear)
               for name in layer_names(model))
    assert layer_names(model)[-1] == "lm_head" and len(layer_names(model)) == 5


@pytest.mark.slow  # trains, and fits EK-FAC over every token's logits
@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None,
                    reason="Kronfluence is not installed (benchmarks/install_peers.sh)")
def test_tiny_run_scores_with_every_method(tmp_path):
    out = tmp_path / "gpt2.json"
    main(["--n-train", "4", "--n-queries", "2", "--context", "4", "--layers", "1", "--width",
          "4", "--epochs", "1", "--batch", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"fastinfluence-gn-exact", "fastinfluence-ekfac",
                                      "kronfluence-ekfac"}
    assert all(len(s) == 4 for s in report["scores"].values())
    assert report["methods"]["fastinfluence-gn-exact"]["notes"]["solve"]["converged"]
