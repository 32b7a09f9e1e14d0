"""Kronfluence on its home ground: EK-FAC influence on a tiny GPT-2 language model, beside
fastinfluence's exact Gauss-Newton scores and its own EK-FAC.

The model and data are those of ``examples/gpt2_influence.py`` (a character-level GPT-2
trained on the standard library's docstrings), at a smaller size by default. Every method
scores the same training sequences for the same queries with the same damping λ over the same
layers, the attention and MLP ``Conv1D`` layers and ``lm_head`` (the layers Kronfluence
tracks once ``Conv1D`` is rewritten as ``nn.Linear``, as Kronfluence's own GPT-2 example does):

``I(z) = −∇L_qᵀ (G + λI)^{-1} ∇l(z)``, ``l`` a sequence's mean next-token cross-entropy,
``L_q`` the mean of ``l`` over the queries, ``G`` the curvature of the mean training loss.

* **exact** (``fastinfluence-gn-exact``): fastinfluence's Gauss-Newton ``G`` solved by CG in
  float64 to ``--exact-tol`` (its relative residual is reported): exact up to that residual.
* **fastinfluence-ekfac**: ``hessian="ekfac"`` (float32), Gauss-Newton factors.
* **kronfluence-ekfac**: ``FactorArguments(strategy="ekfac")`` (float32), the true Fisher
  (labels sampled from the model per token), ``ScoreArguments(damping_factor=λ)`` (additive),
  query gradients aggregated (``aggregate_query_gradients``): its score is
  ``∇(Σ_j l(q_j))ᵀ F_λ^{-1} ∇l(z)`` with no minus, hence ``I(z) = −score / n_queries``.

Each method runs once, in this process, after every import (``--rounds`` for the median of
more); seconds are fit (curvature, factors, the solve) and scoring. Agreement is Pearson,
Spearman and relative error (``bench_peers.compare``) against the exact scores, and between
the two EK-FACs. Run it in an environment with Kronfluence (``benchmarks/install_peers.sh``)
and ``transformers`` (``pip install transformers==5.25.0``: it does not depend on torch, so pip
leaves the pinned torch alone; the committed run used it)::

    PYTHONPATH=. python benchmarks/bench_peers_gpt2.py --threads 1 \\
        --out benchmarks/results/peers_gpt2_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_peers import _timed, compare
from torch import nn
from torch.utils.data import TensorDataset

import fastinfluence as fi
from fastinfluence.losses import sequence_cross_entropy

HERE = Path(__file__).resolve().parent


def load_example():
    """``examples/gpt2_influence.py`` as a module (its corpus, tokenizer and model)."""
    spec = importlib.util.spec_from_file_location(
        "gpt2_influence", HERE.parent / "examples" / "gpt2_influence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up there
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--n-train", type=int, default=64, help="training sequences")
    add("--n-queries", type=int, default=4, help="query sequences (one aggregated query loss)")
    add("--context", type=int, default=16)
    add("--layers", type=int, default=2)
    add("--width", type=int, default=32)
    add("--epochs", type=int, default=30)
    add("--damping", type=float, default=1e-2)
    add("--exact-tol", type=float, default=1e-8, help="the exact solve's CG tolerance")
    add("--batch", type=int, default=32, help="Kronfluence's per-device batch size")
    add("--rounds", type=int, default=1)
    add("--threads", type=int, default=None)
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=HERE / "results" / "peers_gpt2_cpu.json")
    return parser.parse_args(argv)


def layer_names(model: nn.Module) -> list[str]:
    """The attention and MLP ``Conv1D`` layers and ``lm_head``."""
    return [name for name, module in model.named_modules()
            if type(module).__name__ == "Conv1D"] + ["lm_head"]


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``Conv1D`` (``y = x W + b``, ``W`` ``[in, out]``) an
    ``nn.Linear`` of the same map (weight ``Wᵀ``): Kronfluence tracks Linear and Conv2d only."""
    model = copy.deepcopy(model)
    for name in layer_names(model)[:-1]:
        parent_name, _, child = name.rpartition(".")
        conv = model.get_submodule(name)
        linear = nn.Linear(*conv.weight.shape)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def run_fastinfluence(model, train_ids, query_ids, args, **options):
    names = layer_names(model)

    def fit():
        return fi.Influence(model, (train_ids, train_ids), (query_ids, query_ids),
                            output=lambda out: out.logits,
                            loss_fn=sequence_cross_entropy(reduction="mean"),
                            params=names, damping=args.damping, **options)

    notes: dict[str, Any] = {}

    def score(inf):
        notes.update(hessian=inf.report.hessian, solver=inf.report.solver,
                     scoring=inf.report.scoring, num_params=inf.report.num_params)
        if inf.report.solve is not None:
            notes["solve"] = inf.report.solve.as_dict()
        return inf.scores()

    scores, seconds = _timed(fit, score)
    return scores, seconds, notes


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy (no padding here), ``[batch]``."""
    shifted = logits[:, :-1]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                           reduction="none").view(len(labels), -1).mean(1)


def run_kronfluence(model, train_ids, query_ids, args, tmp: str):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    tracked = layer_names(model)

    class LanguageModelling(Task):
        """Per-sequence mean token cross-entropy, summed over the batch (Kronfluence's
        convention)."""

        def compute_train_loss(self, batch, model, sample=False):
            (ids,) = batch
            logits = model(ids).logits
            labels = ids
            if sample:  # the true Fisher: every next token drawn from the model
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                    labels = torch.cat([ids[:, :1], drawn.view(ids.shape)[:, :-1]], dim=1)
            return sequence_losses(logits, labels).sum()

        def compute_measurement(self, batch, model):
            (ids,) = batch
            return sequence_losses(model(ids).logits, ids).sum()

        def get_influence_tracked_modules(self):
            return tracked

    task = LanguageModelling()
    prepared = prepare_model(conv1d_as_linear(model).eval(), task)
    analyzer = Analyzer(analysis_name="bench", model=prepared, task=task, cpu=True,
                        disable_tqdm=True, disable_model_save=True, output_dir=tmp)
    train_set, query_set = TensorDataset(train_ids), TensorDataset(query_ids)

    def fit():
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train_set,
                                 per_device_batch_size=args.batch,
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)

    def score(_fitted):
        analyzer.compute_pairwise_scores(
            scores_name="ekfac", factors_name="ekfac", query_dataset=query_set,
            train_dataset=train_set, per_device_query_batch_size=len(query_ids),
            per_device_train_batch_size=args.batch,
            score_args=ScoreArguments(damping_factor=args.damping,
                                      aggregate_query_gradients=True),
            overwrite_output_dir=True)
        raw = analyzer.load_pairwise_scores("ekfac")["all_modules"]
        return -raw.sum(0) / len(query_ids)

    scores, seconds = _timed(fit, score)
    return scores, seconds, {"tracked_modules": tracked}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import kronfluence  # noqa: F401  (imported before any timing)

    example = load_example()
    settings = example.Settings(
        n_train=args.n_train, n_queries=args.n_queries, context=args.context,
        layers=args.layers, width=args.width, epochs=args.epochs, lr=3e-3, params="attention-mlp",
        damping=args.damping, cg_iterations=1, top=1, seed=args.seed)
    train_ids, query_ids = example.split(settings)
    model = example.build_model(settings)
    training = example.train(model, train_ids, settings)
    training.update(train_loss=example.mean_token_loss(model, train_ids),
                    query_loss=example.mean_token_loss(model, query_ids))
    model64 = copy.deepcopy(model).double()

    methods = {
        "fastinfluence-gn-exact": lambda tmp: run_fastinfluence(
            model64, train_ids, query_ids, args, hessian="gauss-newton", solver="cg",
            tol=args.exact_tol, max_iter=5000),
        "fastinfluence-ekfac": lambda tmp: run_fastinfluence(
            model, train_ids, query_ids, args, hessian="ekfac"),
        "kronfluence-ekfac": lambda tmp: run_kronfluence(model, train_ids, query_ids, args, tmp),
    }
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, torch.Tensor] = {}
    for name, run in methods.items():
        rounds = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                scores[name], seconds, notes = run(tmp)
            rounds.append(seconds | {"total": sum(seconds.values())})
            print(f"{name}: {rounds[-1]['total']:.1f} s", flush=True)
        results[name] = {"seconds": {stage: statistics.median(r[stage] for r in rounds)
                                     for stage in rounds[0]}, "notes": notes}
    exact = scores["fastinfluence-gn-exact"]
    agreement = {f"{name} vs exact": compare(scores[name], exact)
                 for name in methods if name != "fastinfluence-gn-exact"}
    agreement["kronfluence-ekfac vs fastinfluence-ekfac"] = compare(
        scores["kronfluence-ekfac"], scores["fastinfluence-ekfac"])
    report = {
        "config": vars(args) | {"out": str(args.out)},
        "command": " ".join(["python", "benchmarks/bench_peers_gpt2.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}, kronfluence {_version('kronfluence')}, transformers "
                   f"{_version('transformers')}",
        "model": {"parameters": sum(p.numel() for p in model.parameters()),
                  "selected_parameters": results["fastinfluence-ekfac"]["notes"]["num_params"],
                  "layers": layer_names(model)} | training,
        "methods": results,
        "agreement": agreement,
        "scores": {name: s.tolist() for name, s in scores.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"methods": {k: v["seconds"] for k, v in results.items()},
                      "agreement": agreement}, indent=1))
    print(f"wrote {args.out}")
    return report


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


if __name__ == "__main__":
    main()
