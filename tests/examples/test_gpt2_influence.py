"""Smoke test of examples/gpt2_influence.py: a tiny GPT-2 trained for one epoch, every training
sequence scored for one query, the table written from the runs and a rerun resumed."""

from __future__ import annotations

import json

import pytest
from example_loader import load_example

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # imports the corpus' modules, trains and solves

TINY = ["--n-train", "8", "--n-queries", "1", "--context", "8", "--layers", "1", "--width",
        "8", "--epochs", "1", "--cg-iterations", "3", "--top", "2", "--threads", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def example():
    return load_example("gpt2_influence")


def test_tokenizer_round_trips_printable_ascii_and_replaces_the_rest(example):
    assert example.decode(example.encode("def f(x): ~")) == "def f(x): ~"
    assert example.decode(example.encode("é\t")) == "??"
    assert max(example.encode("~")) == example.VOCABULARY - 1


def test_windows_are_whole_and_in_corpus_order(example):
    ids = example.windows(["abcdefg", "xyz"], 3)
    assert [example.decode(w) for w in ids] == ["abc", "def", "xyz"]


def test_scores_every_training_sequence_and_ranks_them(example, tmp_path):
    result = example.main([*TINY, "--out", str(tmp_path)])
    (run,) = result["runs"]
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert saved["runs"] == result["runs"]
    scores = run["scores"]
    assert len(scores) == 8 and all(map(lambda s: s == s, scores))
    assert [e["score"] for e in run["helpful"]] == sorted(scores)[:2]
    assert [e["score"] for e in run["harmful"]] == sorted(scores, reverse=True)[:2]
    assert run["solve"]["hessian"] == "gauss-newton" and run["solve"]["solver"] == "cg"
    table = (tmp_path / "table.md").read_text()
    assert run["helpful"][0]["text"].replace("|", "¦").replace("`", "'") in table
    # a rerun with the same settings finds every query done and trains nothing
    again = example.main([*TINY, "--out", str(tmp_path)])
    assert again["runs"] == result["runs"]
    assert (tmp_path / "table.md").read_text() == table
