"""The training sequences most influential on a query, for a tiny GPT-2 trained on the Python
standard library's docstrings.

The corpus is already on every machine that runs this: the docstrings of a fixed list of
standard-library modules (each module's own and those of its public members, in name order),
whitespace collapsed, cut into windows of ``--context`` characters. The tokenizer is one
token per printable ASCII character (any other character becomes ``?``): no download and no
pretrained tokenizer. A seeded shuffle of the windows gives ``--n-train`` training sequences and
``--n-queries`` held-out query sequences.

A ``GPT2LMHeadModel`` built from a ``GPT2Config`` (random initialisation, untied ``lm_head``,
no dropout) is trained with Adam on the training sequences (seeded). Then, for each query,
``fi.Influence`` with the query as the validation set scores every training sequence:
``I(z) = −∇L_queryᵀ (G + λI)^{-1} ∇l(z)``, ``l`` the sequence's mean next-token cross-entropy
(:func:`fastinfluence.losses.sequence_cross_entropy`), ``G`` the Gauss-Newton matrix of the
mean training loss over ``--params`` (``all``: every parameter), solved by CG. Negative scores
help the query (up-weighting the sequence lowers the query's loss), positive ones harm it.

Outputs in ``--out``: ``runs.json`` (the settings, the training summary and, per query, every
score and the top sequences) and ``table.md`` (per query, the ``--top`` most helpful and
harmful training sequences with their scores).

    python examples/gpt2_influence.py --threads 1          # CPU default (about 3 minutes)
    python examples/gpt2_influence.py --full               # larger corpus, model and training
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastinfluence as fi
from fastinfluence.experiments import (
    ExperimentCLI,
    Session,
    format_markdown_table,
    setting,
)
from fastinfluence.losses import sequence_cross_entropy
from fastinfluence.robust import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent
MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "difflib", "enum", "fractions", "functools", "glob",
    "gzip", "heapq", "inspect", "io", "itertools", "json", "logging", "math", "operator",
    "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string", "textwrap",
    "threading", "typing", "unittest", "uuid", "zipfile",
)
"""The standard-library modules whose docstrings make the corpus, in this order."""
FIRST_CHARACTER, LAST_CHARACTER = 32, 126
VOCABULARY = LAST_CHARACTER - FIRST_CHARACTER + 1
"""One token per printable ASCII character, ``' '`` (token 0) to ``'~'``."""


@dataclass(frozen=True)
class Settings:
    n_train: int = setting(256, 1024, help="training sequences", type=int)
    n_queries: int = setting(3, 5, help="held-out query sequences", type=int)
    context: int = setting(32, 64, help="characters per sequence (GPT-2's n_positions)", type=int)
    layers: int = setting(2, 4, help="transformer blocks", type=int)
    width: int = setting(64, 128, help="embedding width (4 heads)", type=int)
    epochs: int = setting(40, 60, help="training epochs (Adam, batch 32)", type=int)
    lr: float = setting(3e-3, 2e-3, help="Adam learning rate", type=float)
    params: str = setting("all", "attention-mlp", choices=["all", "attention-mlp"],
                          help="the parameters influence is taken over: every parameter, or "
                               "the attention and MLP Conv1D layers and lm_head")
    damping: float = setting(0.1, help="λ in G + λI", type=float)
    cg_iterations: int = setting(60, 200, help="CG iteration cap", type=int)
    top: int = setting(5, help="helpful and harmful sequences shown per query", type=int)
    seed: int = setting(0, help="the seed of the shuffle, the initialisation and training",
                        type=int)



def check(settings: Settings) -> str | None:
    for name in ("n_train", "n_queries", "context", "layers", "width", "epochs",
                 "cg_iterations", "top"):
        if getattr(settings, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}"
    if settings.width % 4:
        return f"--width must be a multiple of 4 (the heads), got {settings.width}"
    return None


CLI = ExperimentCLI(Settings, __doc__, "examples/gpt2_influence.py",
                    ROOT / "results" / "gpt2_influence", check=check)


# ----------------------------------------------------------------------------- corpus


def docstrings(modules: tuple[str, ...] = MODULES) -> list[str]:
    """The docstrings of ``modules``: each module's, then its public members' (those it
    defines, in name order), whitespace collapsed, each text once."""
    texts: dict[str, None] = {}
    for name in modules:
        module = importlib.import_module(name)
        found = [inspect.getdoc(module)]
        with warnings.catch_warnings():  # reading typing's deprecated io/re aliases warns
            warnings.simplefilter("ignore", DeprecationWarning)
            for member_name in sorted(vars(module)):
                member = vars(module)[member_name]
                if member_name.startswith("_") or getattr(member, "__module__", None) != name:
                    continue
                found.append(inspect.getdoc(member))
        for text in found:
            if text:
                texts.setdefault(re.sub(r"\s+", " ", text).strip())
    return list(texts)


def encode(text: str) -> list[int]:
    """Token ids of ``text``: printable ASCII characters as themselves, any other as ``?``."""
    return [ord(c) - FIRST_CHARACTER if FIRST_CHARACTER <= ord(c) <= LAST_CHARACTER
            else ord("?") - FIRST_CHARACTER for c in text]


def decode(ids: list[int]) -> str:
    return "".join(chr(i + FIRST_CHARACTER) for i in ids)


def windows(texts: list[str], context: int) -> list[list[int]]:
    """Every whole window of ``context`` tokens of every text (non-overlapping; a text's
    shorter tail is left out, so no sequence needs padding)."""
    return [ids[start : start + context] for ids in map(encode, texts)
            for start in range(0, len(ids) - context + 1, context)]


def split(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, queries)`` token ids ``[n, context]``: a seeded shuffle of the windows."""
    pool = windows(docstrings(), settings.context)
    needed = settings.n_train + settings.n_queries
    if len(pool) < needed:
        raise SystemExit(f"the corpus has {len(pool)} windows of {settings.context} characters, "
                         f"fewer than --n-train + --n-queries = {needed}")
    random.Random(settings.seed).shuffle(pool)
    ids = torch.tensor(pool[:needed])
    return ids[: settings.n_train], ids[settings.n_train :]


# ----------------------------------------------------------------------------- model


def build_model(settings: Settings) -> GPT2LMHeadModel:
    """The untrained GPT-2 (seeded; ``lm_head`` untied, so it is a layer of its own)."""
    torch.manual_seed(settings.seed)
    config = GPT2Config(vocab_size=VOCABULARY, n_positions=settings.context,
                        n_embd=settings.width, n_layer=settings.layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def mean_token_loss(model: GPT2LMHeadModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(sequence_cross_entropy(reduction="mean")(model(ids).logits, ids).mean())


class LanguageModelTrainer(Trainer):
    """The shared loop on the mean next-token cross-entropy of each batch of token ids."""

    method = "gpt2"
    loss_fn = staticmethod(sequence_cross_entropy(reduction="mean"))

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x).logits, x).mean()


def train(model: GPT2LMHeadModel, ids: torch.Tensor, settings: Settings,
          batch_size: int = 32) -> dict[str, Any]:
    """Adam on the mean next-token cross-entropy (seeded batches, a last short batch kept
    alone) on the shared loop; the model comes back in eval mode."""
    config = TrainConfig(epochs=settings.epochs, lr=settings.lr, batch_size=batch_size,
                         seed=settings.seed, flip=False, join_single_batch=False)
    start = time.perf_counter()
    LanguageModelTrainer(model, config).fit_unlabelled(ids)
    return {"seconds": time.perf_counter() - start}


def selected_params(model: GPT2LMHeadModel, which: str) -> str | list[str]:
    """``"all"``, or the names of the attention and MLP ``Conv1D`` layers and ``lm_head``."""
    if which == "all":
        return "all"
    return [name for name, module in model.named_modules()
            if type(module).__name__ == "Conv1D"] + ["lm_head"]


# ----------------------------------------------------------------------------- influence


def query_run(model: GPT2LMHeadModel, train_ids: torch.Tensor, query: torch.Tensor,
              index: int, settings: Settings) -> dict[str, Any]:
    """Every training sequence's influence on one query's loss, and the top sequences."""
    start = time.perf_counter()
    inf = fi.Influence(model, (train_ids, train_ids), (query[None], query[None]),
                       output=lambda out: out.logits,
                       loss_fn=sequence_cross_entropy(reduction="mean"),
                       params=selected_params(model, settings.params),
                       hessian="gauss-newton", solver="cg", damping=settings.damping,
                       max_iter=settings.cg_iterations)
    scores = inf.scores()
    order = scores.argsort().tolist()

    def listed(indices: list[int]) -> list[dict[str, Any]]:
        return [{"index": i, "text": decode(train_ids[i].tolist()), "score": float(scores[i])}
                for i in indices]

    report = inf.report
    return {"query": index, "text": decode(query.tolist()),
            "query_loss": mean_token_loss(model, query[None]),
            "helpful": listed(order[: settings.top]),
            "harmful": listed(order[::-1][: settings.top]),
            "scores": scores.tolist(), "seconds": time.perf_counter() - start,
            "solve": {"hessian": report.hessian, "solver": report.solver,
                      "scoring": report.scoring,
                      "iterations": report.solve.iterations,
                      "relative_residual": report.solve.relative_residual,
                      "converged": report.solve.converged}}


# ----------------------------------------------------------------------------- table


def shown(text: str) -> str:
    """A sequence as a table cell: a code span (``|`` and backticks would end the cell or
    the span, so they are shown as ``¦`` and ``'``)."""
    return "`" + text.replace("|", "¦").replace("`", "'") + "`"


def render_table(settings: Settings, runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    training = meta.get("training", {})
    lines = [
        "# Training sequences most influential on held-out queries: tiny GPT-2, stdlib "
        "docstrings", "",
        f"Command: `{meta['command']}` ({meta.get('date', 'undated')}; {meta['machine']}).", "",
        f"GPT-2 with {settings.layers} blocks, width {settings.width}, context "
        f"{settings.context}, {training.get('parameters', '?')} parameters; "
        f"{settings.n_train} training sequences of {training.get('windows', '?')} windows of "
        f"{training.get('docstrings', '?')} docstrings; {settings.epochs} epochs in "
        f"{training.get('seconds', float('nan')):.0f} s; mean token loss "
        f"{training.get('train_loss', float('nan')):.3f} on the training sequences, "
        f"{training.get('query_loss', float('nan')):.3f} on the queries. Influence over "
        f"`params={settings.params!r}`, Gauss-Newton CG, λ = {settings.damping:g}; negative "
        f"scores help the query, positive ones harm it.", "",
    ]
    for run in sorted(runs, key=lambda r: r["query"]):
        solve = run["solve"]
        lines += [f"## Query {run['query']}: {shown(run['text'])}", "",
                  f"Query loss {run['query_loss']:.3f}; {solve['solver']} "
                  f"({solve['iterations']} iterations, relative residual "
                  f"{solve['relative_residual']:.1e}), {run['seconds']:.0f} s.", ""]
        rows = [[str(rank + 1), shown(helpful["text"]), f"{helpful['score']:.3g}",
                 shown(harmful["text"]), f"{harmful['score']:.3g}"]
                for rank, (helpful, harmful) in enumerate(zip(run["helpful"], run["harmful"],
                                                               strict=True))]
        lines += [format_markdown_table(["rank", "most helpful", "score", "most harmful",
                                         "score"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    session = Session(CLI, argv, lambda run: run["query"], render_table)
    settings = session.settings
    with session:
        queries = list(range(settings.n_queries))
        pending = [q for q in queries if not session.done(q)]
        if pending and not session.args.no_train:
            train_ids, query_ids = split(settings)
            model = build_model(settings)
            summary = train(model, train_ids, settings)
            summary.update(parameters=sum(p.numel() for p in model.parameters()),
                           docstrings=len(docstrings()),
                           windows=len(windows(docstrings(), settings.context)),
                           train_loss=mean_token_loss(model, train_ids),
                           query_loss=mean_token_loss(model, query_ids))
            session.meta.update(training=summary,
                                date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))

            def work(q: int) -> None:
                if not session.done(q):
                    session.save(query_run(model, train_ids, query_ids[q], q, settings))

            session.run(pending, work, lambda q: f"query {q}", desc="queries", unit="query")
        elif session.runs_path.exists():  # nothing trained here: the saved runs' training
            saved_meta = json.loads(session.runs_path.read_text())["meta"]
            session.meta.update({key: saved_meta[key] for key in ("training", "date")
                                 if key in saved_meta})
        session.finish([])
    for run in sorted(session.runs, key=lambda r: r["query"]):
        print(f"\nquery {run['query']}: {run['text']!r}")
        for kind in ("helpful", "harmful"):
            for entry in run[kind]:
                print(f"  {kind:7s} {entry['score']:+.3e}  {entry['text']!r}")
    return {"runs": session.runs, "out": session.out}


if __name__ == "__main__":
    main(sys.argv[1:])
