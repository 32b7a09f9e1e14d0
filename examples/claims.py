"""The papers' pages' claims, computed from the committed runs (``examples/results/*/runs.json``).

Each claim function reads the runs it needs and returns a :class:`Claim`: its numbers, and the
phrases that state them on the documentation pages (``docs/papers/*.md``). ``--check`` fails when
a page lacks one of those phrases, so a rerun that changes a ``runs.json`` fails until the page
says what the new runs show (``tests/examples/test_claims.py`` runs the same check).

    python examples/claims.py            # every claim's numbers and phrases
    python examples/claims.py --check    # exit 1 when a page lacks a phrase
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
PAPERS = ROOT / "docs" / "papers"


@dataclass
class Claim:
    """One claim of the pages: ``numbers`` from the runs, and ``phrases``: page name (under
    ``docs/papers``) → the exact phrases (whitespace aside) that page must contain."""

    name: str
    numbers: dict[str, Any]
    phrases: dict[str, list[str]]


def load_runs(results: Path, folder: str) -> dict[str, Any]:
    """``runs.json`` of one committed results folder."""
    return json.loads((results / folder / "runs.json").read_text())


def signed(value: float, digits: int = 1) -> str:
    """``+1.6`` / ``−0.3`` (the pages' minus sign); a value that rounds to zero is ``0.0``."""
    text = f"{value:+.{digits}f}"
    if float(text) == 0:
        return f"{0:.{digits}f}"
    return text.replace("-", "−")


def percent(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f} %"


# -- MRS: influence-based distillation against the softmax set --------------------------------

FEW_TUMOUR = 0.1
"""A selection whose tumour-labelled share is under this is listed (with the sensitivity of
the network mixed from it): it can hardly teach the tumour class."""


def pair_name(pair: tuple[int, int]) -> str:
    return f"seed {pair[0]} fold {pair[1]}"

def mrs_influence_distillation(results: Path = RESULTS) -> Claim:
    """The influence selections against the softmax set of the same size (θ, E of the CPU
    default), per (seed, fold) pair. Only tumour-labelled spectra can be mislabelled (the
    simulator labels a tumour patient's whole hemisphere tumour; ``make_mrs``), so the fair
    comparison is the mislabelled fraction *of the tumour-labelled spectra* of a selection. A
    selection without one class ("one-class") trains a network that cannot learn that class;
    it is listed and left out of the per-pair comparison of that fraction, as are the pairs
    where the softmax set has no tumour-labelled spectrum. Selections whose tumour share is
    under :data:`FEW_TUMOUR` are listed with the sensitivity of the network mixed from them,
    and the influence-helpful row's AUC against the plain ResCNN is given with and without
    them."""
    saved = load_runs(results, "mrs_table2")
    settings = saved["settings"]
    main = {"alpha": settings["alpha"], "factor": settings["factor"],
            "source_epoch": settings["source_epoch"], "strategy": "both",
            "threshold": settings["thresholds"][0]}
    runs: dict[tuple[int, int], dict[str, dict]] = {}
    for run in saved["runs"]:
        options = run.get("options", {})
        if run["kind"] == "mixing" and all(options.get(k) == v for k, v in main.items()):
            runs.setdefault((run["seed"], run["fold"]), {})[options["selection"]] = run
    pairs = sorted(runs)
    softmax = {pair: runs[pair]["softmax"]["certain_summary"] for pair in pairs}

    def of_tumour(summary: dict) -> float:
        return summary["mislabelled"] / summary["per_class"][1]

    def pooled(summaries: list[dict]) -> float:
        return (sum(s["mislabelled"] for s in summaries)
                / sum(s["per_class"][1] for s in summaries))

    def healthy_share(summaries: list[dict]) -> str:
        shares = [100 * s["per_class"][0] / s["size"] for s in summaries]
        return (f"{min(shares):.0f}–{max(shares):.0f} % "
                f"(median {statistics.median(shares):.0f} %)")

    numbers: dict[str, Any] = {"pairs": len(pairs), "softmax": {
        "mislabelled_of_tumour_pooled": pooled(list(softmax.values()))}}
    rows = [f"| softmax, θ = {main['threshold']:g}, E = {main['source_epoch']} | – | – | "
            f"{percent(pooled(list(softmax.values())))} | – | "
            f"{healthy_share(list(softmax.values()))} |"]
    flagged = []
    for selection in ("influence-helpful", "influence-self"):
        chosen = {pair: runs[pair][selection] for pair in pairs}
        summaries = {pair: run["certain_summary"] for pair, run in chosen.items()}
        one_class = [p for p in pairs if min(summaries[p]["per_class"]) == 0]
        comparable = [p for p in pairs if p not in one_class and softmax[p]["per_class"][1]]
        fewer_in_total = sum(summaries[p]["mislabelled"] < softmax[p]["mislabelled"]
                             for p in pairs)
        cleaner_of_tumour = sum(of_tumour(summaries[p]) < of_tumour(softmax[p])
                                for p in comparable)
        mean_of_tumour = (statistics.mean(of_tumour(summaries[p]) for p in comparable),
                          statistics.mean(of_tumour(softmax[p]) for p in comparable))
        few_tumour = [p for p in pairs
                      if summaries[p]["per_class"][1] < FEW_TUMOUR * summaries[p]["size"]]
        numbers[selection] = {
            "fewer_mislabelled_in_total": fewer_in_total,
            "smaller_mislabelled_fraction_of_tumour": cleaner_of_tumour,
            "comparable_pairs": len(comparable),
            "mislabelled_of_tumour_pooled": pooled(list(summaries.values())),
            "mislabelled_of_tumour_mean_per_pair_vs_softmax": mean_of_tumour,
            "one_class": [pair_name(p) for p in one_class],
            "few_tumour": {pair_name(p): (summaries[p]["per_class"],
                                          chosen[p]["metrics"]["sensitivity"])
                           for p in few_tumour}}
        rows.append(f"| {selection} | {fewer_in_total} of {len(pairs)} | "
                    f"{cleaner_of_tumour} of {len(comparable)} | "
                    f"{percent(pooled(list(summaries.values())))} | "
                    f"{percent(mean_of_tumour[0])} / {percent(mean_of_tumour[1])} | "
                    f"{healthy_share(list(summaries.values()))} |")
        flagged += [f"{selection} on {pair_name(p)}: "
                    f"{summaries[p]['per_class'][0]} healthy, {summaries[p]['per_class'][1]} "
                    f"tumour, sensitivity {chosen[p]['metrics']['sensitivity']:.2f}"
                    for p in few_tumour]
    plain = {(run["seed"], run["fold"]): run["metrics"]["auc"] for run in saved["runs"]
             if run["kind"] == "plain"}
    helpful = numbers["influence-helpful"]
    kept = [p for p in pairs if pair_name(p) not in helpful["few_tumour"]]
    for name, chosen_pairs in (("all", pairs), ("without_few_tumour", kept)):
        differences = [runs[p]["influence-helpful"]["metrics"]["auc"] - plain[p]
                       for p in chosen_pairs]
        helpful[f"auc_minus_plain_{name}"] = (statistics.mean(differences),
                                              statistics.pstdev(differences), len(differences))
    flagged += [f"AUC − plain ResCNN {signed(mean, 3)} ± {std:.3f} over {n} pairs"
                for mean, std, n in (helpful["auc_minus_plain_all"],
                                     helpful["auc_minus_plain_without_few_tumour"])]
    summary = [f"{numbers[s]['fewer_mislabelled_in_total']} of {len(pairs)}"
               for s in ("influence-helpful", "influence-self")]
    summary.append(f"{percent(numbers['influence-helpful']['mislabelled_of_tumour_pooled'])} "
                   f"of its tumour-labelled spectra mislabelled against "
                   f"{percent(numbers['softmax']['mislabelled_of_tumour_pooled'])}")
    return Claim("mrs_influence_distillation", numbers,
                 {"mrs.md": rows + flagged, "index.md": summary})


def mrs_selected_share(saved: dict[str, Any], theta: float) -> dict[tuple[int, int], dict]:
    """Per (seed, fold) plain run: the share of the training set in the softmax ``C`` at
    ``theta`` (E = the source epoch), its healthy share, and the proposed model's (aug-with-
    both, other options at their defaults) test AUC on it (``None`` where it did not train)."""
    settings = saved["settings"]
    default = {"alpha": settings["alpha"], "factor": settings["factor"],
               "source_epoch": settings["source_epoch"], "strategy": "both",
               "selection": "softmax", "threshold": theta}
    proposed = {(run["seed"], run["fold"]): run["metrics"]["auc"] for run in saved["runs"]
                if run["kind"] == "mixing" and run.get("options") == default
                and "metrics" in run}
    out = {}
    for run in saved["runs"]:
        if run["kind"] != "plain":
            continue
        chosen = run["certain_summary"][str(theta)][str(settings["source_epoch"])]
        pair = (run["seed"], run["fold"])
        out[pair] = {"share": chosen["size"] / run["train_summary"]["size"],
                     "healthy": chosen["per_class"][0] / chosen["size"] if chosen["size"]
                     else None, "auc": proposed.get(pair)}
    return out


def share_range(per_pair: dict[tuple[int, int], dict]) -> str:
    shares = [v["share"] for v in per_pair.values()]
    return (f"{100 * min(shares):.0f}–{100 * max(shares):.0f} % "
            f"(mean {100 * statistics.mean(shares):.0f} %)")


def mrs_threshold_and_figures(results: Path = RESULTS) -> Claim:
    """The committed 20 pairs: how much of the training set each θ puts into ``C`` and how
    much of it is healthy; Fig. 4B's medians (distance to the other class's centre, all
    against distilled, per class, from the first fold's figure inputs); and the first fold's
    default AUCs (where Figs. 5–7's sweeps ran) against the mean over every pair."""
    import torch

    saved = load_runs(results, "mrs_table2")
    numbers: dict[str, Any] = {}
    phrases = []
    for theta in saved["settings"]["thresholds"]:
        per_pair = mrs_selected_share(saved, theta)
        healthy = [v["healthy"] for v in per_pair.values() if v["healthy"] is not None]
        numbers[f"theta {theta:g}"] = per_pair
        phrases.append(f"θ = {theta:g} puts {share_range(per_pair)} of the training set into "
                       f"C, {100 * min(healthy):.0f}–{100 * max(healthy):.0f} % of it healthy")
    inputs = torch.load(results / "mrs_table2" / "figure_inputs" / "figure4.pt")
    labels, distilled = inputs["labels"], inputs["distilled"]
    medians = {}
    for label, name in ((0, "healthy"), (1, "tumour")):
        every = inputs["distance"][labels == label].tolist()
        chosen = inputs["distance"][(labels == label) & distilled].tolist()
        medians[name] = (statistics.median(every), statistics.median(chosen))  # as the figure
        phrases.append(f"{name}: median {medians[name][0]:.2f} for all, "
                       f"{medians[name][1]:.2f} for the distilled "
                       f"({signed(100 * (medians[name][1] / medians[name][0] - 1))} %)")
    numbers["figure4b_medians"] = medians
    first = (0, saved["settings"]["sweep_folds"][0])
    for kind, name in (("plain", "plain ResCNN"),):
        aucs = {(run["seed"], run["fold"]): run["metrics"]["auc"] for run in saved["runs"]
                if run["kind"] == kind}
        values = list(aucs.values())
        numbers[f"{kind}_auc_first_fold_vs_all"] = (aucs[first], statistics.mean(values))
        phrases.append(f"{name} on seed {first[0]} fold {first[1]}: AUC {aucs[first]:.2f}, "
                       f"against {statistics.mean(values):.2f} ± "
                       f"{statistics.pstdev(values):.2f} over all {len(values)} pairs")
    plain = sorted(aucs, key=aucs.get, reverse=True)
    numbers["first_fold_plain_rank"] = plain.index(first) + 1
    rank = numbers["first_fold_plain_rank"]
    phrases.append(f"{'the' if rank == 1 else f'number {rank} of the'} highest of the "
                   f"{len(values)} plain ResCNN AUCs")
    proposed = mrs_selected_share(saved, saved["settings"]["thresholds"][0])
    numbers["proposed_auc_first_fold"] = proposed[first]["auc"]
    phrases.append(f"the proposed model {proposed[first]['auc']:.2f} there")
    settings = saved["settings"]
    sweeps = [run for run in saved["runs"] if run["kind"] == "mixing"
              and (run["seed"], run["fold"]) == first
              and any(run["options"][k] != settings[k]
                      for k in ("alpha", "factor", "source_epoch"))]
    seconds = statistics.mean(run["seconds"] for run in sweeps)
    numbers["sweep_runs_per_fold"] = (len(sweeps), seconds)
    phrases.append(f"{len(sweeps)} runs of {seconds:.0f} s each on average, "
                   f"{len(sweeps) * seconds / 60:.0f} min of one core per fold")
    return Claim("mrs_threshold_and_figures", numbers, {"mrs.md": phrases})


MRS_SWEEPS = (("alpha", "α"), ("source_epoch", "E"), ("factor", "factor"))
"""Figs. 5–7's sweeps: the option and its name on the page."""


def mrs_sweeps(results: Path = RESULTS) -> Claim:
    """Figs. 5–7 as tables: for each swept option and strategy, the test AUC at each value
    (the others at their defaults) as mean ± std over the sweep folds of seed 0, where every
    sweep fold has the run; and the plain ResCNN's AUC on the same folds."""
    saved = load_runs(results, "mrs_table2")
    settings = saved["settings"]
    folds = settings["sweep_folds"]
    base = {"alpha": settings["alpha"], "factor": settings["factor"],
            "source_epoch": settings["source_epoch"], "selection": "softmax",
            "threshold": settings["thresholds"][0]}
    runs = [run for run in saved["runs"] if run["seed"] == 0 and run["fold"] in folds
            and "metrics" in run]
    numbers: dict[str, Any] = {"sweep_folds": folds}
    phrases = [f"The sweeps ran on seed 0, folds {', '.join(map(str, folds))}"]
    for option, name in MRS_SWEEPS:
        values = sorted({run["options"][option] for run in runs if run["kind"] == "mixing"
                         and all(run["options"][k] == v for k, v in base.items()
                                 if k != option)})
        header = f"| strategy | {' | '.join(f'{name} = {v:g}' for v in values)} |"
        phrases.append(header)
        for strategy in settings["strategies"]:
            cells = []
            for value in values:
                wanted = {**base, option: value, "strategy": strategy}
                aucs = [run["metrics"]["auc"] for run in runs
                        if run["kind"] == "mixing" and run["options"] == wanted]
                numbers[f"{option}={value:g} {strategy}"] = aucs
                cells.append(f"{statistics.mean(aucs):.2f} ± {statistics.pstdev(aucs):.2f}"
                             if len(aucs) == len(folds) else "—")
            phrases.append(f"| aug-with-{strategy} | {' | '.join(cells)} |")
    plain = [run["metrics"]["auc"] for run in runs if run["kind"] == "plain"]
    numbers["plain"] = plain
    phrases.append(f"plain ResCNN on the same folds: {statistics.mean(plain):.2f} ± "
                   f"{statistics.pstdev(plain):.2f}")
    return Claim("mrs_sweeps", numbers, {"mrs.md": phrases})


MRS_VARIANTS = {"mrs_table2_smote": "SMOTE", "mrs_table2_pool": "max-pool shortcut"}
"""The comparison folders, each against ``mrs_table2_theta`` (random oversampling, 1×1
projection shortcut) on the same (seed, fold) pairs."""


def mrs_variants(results: Path = RESULTS) -> Claim:
    """The θ sweep (``mrs_table2_theta``: per θ the share of the training set in ``C``, its
    healthy share and the proposed model's AUC, per fold) and each variant of
    :data:`MRS_VARIANTS` minus the baseline folder on the same (seed, fold): test AUC of the
    plain ResCNN and of the proposed model (aug-with-both, θ = the first threshold)."""
    base = load_runs(results, "mrs_table2_theta")
    numbers: dict[str, Any] = {"theta": {}}
    phrases = []
    for theta in base["settings"]["thresholds"]:
        per_pair = mrs_selected_share(base, theta)
        numbers["theta"][f"{theta:g}"] = per_pair
        folds = sorted(per_pair)
        phrases.append(f"| {theta:g} | " + " | ".join(
            f"{100 * per_pair[p]['share']:.0f} % ({100 * per_pair[p]['healthy']:.0f} % "
            f"healthy), " + ("–" if per_pair[p]["auc"] is None else f"{per_pair[p]['auc']:.2f}")
            if per_pair[p]["healthy"] is not None else "0 %, –" for p in folds) + " |")
    theta = base["settings"]["thresholds"][0]

    def aucs(saved: dict[str, Any]) -> dict[str, dict[tuple[int, int], float]]:
        return {"plain": {(r["seed"], r["fold"]): r["metrics"]["auc"] for r in saved["runs"]
                          if r["kind"] == "plain"},
                "proposed": {p: v["auc"] for p, v in mrs_selected_share(saved, theta).items()
                             if v["auc"] is not None}}

    baseline = aucs(base)
    for folder, name in MRS_VARIANTS.items():
        variant = aucs(load_runs(results, folder))
        numbers[folder] = {}
        cells = []
        for row, label in (("plain", "plain ResCNN"), ("proposed", "proposed model")):
            pairs = sorted(set(variant[row]) & set(baseline[row]))
            differences = [variant[row][p] - baseline[row][p] for p in pairs]
            numbers[folder][row] = dict(zip(map(pair_name, pairs), differences, strict=True))
            cells.append(f"{label} {signed(statistics.mean(differences), 3)} "
                         f"({', '.join(signed(d, 2) for d in differences)}; "
                         f"{sum(d > 0 for d in differences)} of {len(differences)} higher)")
        phrases.append(f"{name} − baseline AUC: " + "; ".join(cells))
    return Claim("mrs_variants", numbers, {"mrs.md": phrases})


# -- Denoising CNNs, Table 1: the gains at ε = 8 -----------------------------------------------

DENOISING_COLUMNS = ("clean", "fgsm4", "fgsm8", "ifgsm4", "ifgsm8", "cw")


def denoising_cells(runs: list[dict], label: str) -> list[str]:
    """One row's cells as the pages print them: final-epoch test accuracy (%) per column, mean
    ± population std over the trials, one decimal."""
    cells = []
    for column in DENOISING_COLUMNS:
        values = [100 * run["accuracy"][column] for run in runs if run["label"] == label]
        cells.append(f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}")
    return cells


def table1_order(label: str, table1: list[dict]) -> tuple[bool, bool, float, float]:
    """The page's row order: NA, the λ_n rows, the λ_a rows, then both (each by weight), read
    from the run key ``resnet18:n<λ_n>a<λ_a>``."""
    key = next(run["key"] for run in table1 if run["label"] == label)
    lambda_n, lambda_a = map(float, re.fullmatch(r"resnet18:n([\d.]+)a([\d.]+)", key).groups())
    return lambda_n > 0 and lambda_a > 0, lambda_a > 0, lambda_n, lambda_a


def denoising_table1_eps8(results: Path = RESULTS) -> Claim:
    """Every Table 1 row (ResNet-18 on SKIN4) as the page's table prints it (final-epoch test
    accuracy, %, mean ± population std over the trials, one decimal), and each defence's gain
    on NA of the same trial at FGSM 8 and I-FGSM 8: the defences that gain in every trial on
    both, and those that lose somewhere, with their per-trial gains."""
    saved = load_runs(results, "denoising_cnn_tables")
    table1 = [run for run in saved["runs"] if run["table"] == 1]
    labels = sorted(dict.fromkeys(run["label"] for run in table1),
                    key=lambda label: table1_order(label, table1))
    trials = sorted({run["trial"] for run in table1})
    accuracy = {(run["label"], run["trial"]): run["accuracy"] for run in table1}
    rows = [f"| {label} | " + " | ".join(denoising_cells(table1, label)) + " |"
            for label in labels]
    gains: dict[str, list[tuple[float, float]]] = {}
    for label in labels:
        if label == "NA":
            continue
        gains[label] = [tuple(100 * (accuracy[label, t][c] - accuracy["NA", t][c])
                              for c in ("fgsm8", "ifgsm8")) for t in trials]
    always = [label for label, per_trial in gains.items()
              if all(g > 0 for trial in per_trial for g in trial)]
    not_always = [label for label in gains if label not in always]

    def per_trial(label: str) -> str:
        return "; ".join(f"trial {t}: {signed(f)} / {signed(i)}"
                         for t, (f, i) in zip(trials, gains[label], strict=True))

    spread = [100 * (max(accuracy["NA", t][c] for t in trials)
                     - min(accuracy["NA", t][c] for t in trials)) for c in ("fgsm8", "ifgsm8")]
    phrases = [*rows,
               f"NA's own accuracy at ε = 8 differs by {spread[0]:.1f} / {spread[1]:.1f} points "
               "between the trials",
               "gain on NA at ε = 8 (FGSM 8 and IFGSM 8) in both trials: " + "; ".join(always),
               *(f"{label} ({per_trial(label)})" for label in not_always)]
    numbers = {"rows": rows, "gains_fgsm8_ifgsm8": gains, "na_spread_fgsm8_ifgsm8": spread,
               "gain_in_every_trial": always, "not_in_every_trial": not_always}
    summary = [f"{len(always)} of {len(gains)} defences gain at ε = 8 in both trials"]
    return Claim("denoising_table1_eps8", numbers, {"denoising-cnn.md": phrases,
                                                     "index.md": summary})


def denoising_example() -> Any:
    """``examples/denoising_cnn_tables.py`` as a module (for the paper's numbers and rows)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import denoising_cnn_tables

    return denoising_cnn_tables


def denoising_paper_tables(results: Path = RESULTS) -> Claim:
    """Tables 3 (VGG-16) and 4 (Reformer and HGD in front of Table 1's classifiers) on SKIN4,
    every row as the page prints it: each cell ours (as :func:`denoising_cells`) / the paper's
    (``PAPER`` of the example; ``–`` where the paper has none), in the example's row order."""
    example = denoising_example()
    saved = load_runs(results, "denoising_cnn_tables")
    settings = example.Settings(**saved["settings"])
    phrases, numbers = [], {}
    for table in (3, 4):
        runs = [run for run in saved["runs"] if run["table"] == table]
        for row in (row for row in example.table_rows(settings) if row.table == table):
            ours = denoising_cells([r for r in runs if r["key"] == row.key], row.label)
            paper = example.paper_cells(table, row)
            cells = [f"{o} / {p}" for o, p in zip(ours, paper, strict=True)]
            numbers[f"Table {table}: {row.label}"] = cells
            phrases.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return Claim("denoising_paper_tables", numbers, {"denoising-cnn.md": phrases})


# -- OUSM + LoOP: detection precision, and the paper's methods at 20 % -----------------------

def detection_precision(saved: dict[str, Any], key: str) -> list[int]:
    """Precision at the noise count (%, mean over trials, rounded as ``table.md``) of one
    ranking of the plain ResNet, per noisy γ."""
    gammas = [g for g in saved["settings"]["gammas"] if g > 0]
    return [round(100 * statistics.mean(
        run["method_summary"]["detection"][key]["precision"] for run in saved["runs"]
        if run["method"] == "resnet" and run["gamma"] == gamma)) for gamma in gammas]


def skin_flip_detection(results: Path = RESULTS) -> Claim:
    """Precision at the noise count of influence on the clean validation loss against the plain
    loss (the plain ResNet before OUSM starts), with the paper's loss-ranked flips and with
    random flips; and how many clean validation labels the influence rows use."""
    numbers: dict[str, Any] = {}
    phrases = []
    for folder, noise in (("ousm_table1", "loss-ranked"), ("ousm_table1_symmetric", "random")):
        saved = load_runs(results, folder)
        influence = detection_precision(saved, "val_influence@warm-up")
        loss = detection_precision(saved, "loss@warm-up")
        numbers[noise] = {"influence_on_clean_val": influence, "loss": loss}
        phrases.append(f"{noise} flips: influence on the clean validation loss "
                       f"{' / '.join(map(str, influence))} %, the loss "
                       f"{' / '.join(map(str, loss))} %")
    validation = load_runs(results, "ousm_table1")["meta"]["images"]["val"]
    numbers["validation_labels"] = validation
    phrases.append(f"{validation} clean validation labels")
    random = numbers["random"]
    summary = [f"random flips: {' / '.join(map(str, random['influence_on_clean_val']))} % "
               f"against {' / '.join(map(str, random['loss']))} %",
               f"{validation} clean validation labels"]
    return Claim("skin_flip_detection", numbers,
                 {"skin-noisy-labels.md": phrases, "index.md": summary})


SKIN_PAPER_METHODS = {"forward": "forward", "ousm": "OUSM", "ousm_loop": "OUSM + LoOP"}


def skin_paper_methods_at(results: Path = RESULTS, gamma: float = 0.2) -> Claim:
    """Each paper method minus the plain ResNet of the same trial at noise ``gamma`` (points,
    mean over trials; trials better), at the final epoch and at the best-validation epoch."""
    saved = load_runs(results, "ousm_table1")
    runs = [run for run in saved["runs"] if run["gamma"] == gamma]
    plain = {run["trial"]: run for run in runs if run["method"] == "resnet"}
    numbers: dict[str, Any] = {}
    phrases = []
    for which, words in (("final", "final epoch"), ("at_best_val", "best-validation epoch")):
        parts, numbers[which] = [], {}
        for method, name in SKIN_PAPER_METHODS.items():
            differences = [100 * (run[which] - plain[run["trial"]][which]) for run in runs
                           if run["method"] == method]
            better = sum(d > 0 for d in differences)
            numbers[which][method] = (statistics.mean(differences), better, len(differences))
            parts.append(f"{name} {signed(statistics.mean(differences))} "
                         f"({better}/{len(differences)})")
        phrases.append(f"{words}: " + ", ".join(parts))
    return Claim(f"skin_paper_methods_at_{100 * gamma:g}", numbers,
                 {"skin-noisy-labels.md": phrases, "index.md": phrases})


# -- ISR/ISP, Figure 1: |δ| on the tumour ------------------------------------------------------

def ratio_numbers(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The mean, range and per-noise means of one ``method_summary`` ratio over ISP runs."""
    ratios = [run["method_summary"][key] for run in runs]
    numbers: dict[str, Any] = {"runs": len(ratios), "mean": statistics.mean(ratios),
                               "range": (min(ratios), max(ratios))}
    for noise in ("gaussian", "rician"):
        numbers[noise] = statistics.mean(run["method_summary"][key]
                                         for run in runs if run["noise"] == noise)
    return numbers


def isp_tumour_ratio(results: Path = RESULTS) -> Claim:
    """ISP's mean |δ| on tumour pixels over its mean on every other pixel of the perturbed
    images (``delta_tumour_to_rest_ratio``, air around the head included), over the Table 1 ISP
    runs; and, from a rerun of those ISP rows with the same settings and seeds that also
    records the ratio against the rest of the head (``delta_tumour_to_head_ratio``;
    ``isr_isp_figure1_head``), both ratios over the same rerun perturbations. How many reruns
    equal Table 1's runs (accuracies) is counted, not assumed: the code has changed since."""
    table1 = [run for run in load_runs(results, "isr_isp_table1")["runs"]
              if run["method"] == "isp"]
    rerun = load_runs(results, "isr_isp_figure1_head")["runs"]
    final = {(run["noise"], run["trial"]): run["final"] for run in table1}
    equal = sum(final[run["noise"], run["trial"]] == run["final"] for run in rerun)
    rest = ratio_numbers(table1, "delta_tumour_to_rest_ratio")
    rerun_rest, rerun_head = (ratio_numbers(rerun, key) for key in (
        "delta_tumour_to_rest_ratio", "delta_tumour_to_head_ratio"))
    numbers = {**rest, "rerun": {"rest": rerun_rest, "head": rerun_head,
                                 "equal_to_table1": (equal, len(rerun))}}

    def described(numbers: dict[str, Any]) -> str:
        low, high = numbers["range"]
        return (f"{numbers['mean']:.2f}× ({low:.2f}–{high:.2f}×; Gaussian "
                f"{numbers['gaussian']:.2f}×, Rician {numbers['rician']:.2f}×)")

    phrases = [f"{rest['mean']:.2f}× that on every other pixel, the air around the head "
               f"included ({rest['runs']} ISP runs, "
               f"{rest['range'][0]:.2f}–{rest['range'][1]:.2f}×; "
               f"Gaussian {rest['gaussian']:.2f}×, Rician {rest['rician']:.2f}×)",
               f"against every other pixel {described(rerun_rest)}, against the rest of the "
               f"head {described(rerun_head)}",
               f"{equal} of {len(rerun)} reruns end with Table 1's accuracies"]
    larger = sum(run["method_summary"]["delta_tumour_to_head_ratio"] > 1 for run in rerun)
    phrases.append("larger on the tumour than on the rest of the head in every run"
                   if larger == len(rerun) else
                   f"larger on the tumour than on the rest of the head in {larger} of {len(rerun)}")
    summary = [f"{rest['mean']:.2f}× against every other pixel, air included",
               f"{rerun_head['mean']:.2f}× against the rest of the head"]
    return Claim("isp_tumour_ratio", numbers, {"isr-isp.md": phrases, "index.md": summary})


def denoising_chest(results: Path = RESULTS) -> Claim:
    """Table 2 (chest X-ray films) and its influence rows as the page prints them (as
    :func:`denoising_cells`), each defence's per-trial gain on NA at FGSM 8 / IFGSM10 8, the
    influence row against the random control per trial, and whether the runs flipped."""
    saved = load_runs(results, "denoising_cnn_tables_chest")
    runs = saved["runs"]
    share = f"{100 * saved['settings']['remove_fraction']:g} %"
    shown = {"influence": f"NA − {share} most harmful (influence)",
             "random": f"NA − {share} random (control)"}  # the page's shorter row names
    labels = list(dict.fromkeys(run["label"] for run in runs))
    names = {run["label"]: shown.get(run["key"].rsplit("minus-", 1)[-1], run["label"])
             for run in runs}
    rows = [f"| {names[label]} | " + " | ".join(denoising_cells(runs, label)) + " |"
            for label in labels]
    trials = sorted({run["trial"] for run in runs})
    accuracy = {(run["label"], run["trial"]): run["accuracy"] for run in runs}
    defences = [run["label"] for run in runs if run["table"] == 2 and run["trial"] == trials[0]]

    def per_trial(label: str, base: str, columns: tuple[str, ...]) -> str:
        return "; ".join(f"trial {t}: " + " / ".join(
            signed(100 * (accuracy[label, t][c] - accuracy[base, t][c])) for c in columns)
            for t in trials)

    influence, random = (next(run["label"] for run in runs if run.get("table") == 5
                              and run["key"].endswith(suffix)) for suffix in ("influence",
                                                                             "random"))
    flips = "with" if saved["settings"].get("flip", True) else "without"
    phrases = [*rows, f"{len(trials)} trials {flips} random horizontal flips",
               *(f"{label}: {per_trial(label, 'NA', ('fgsm8', 'ifgsm8'))}"
                 for label in defences if label != "NA"),
               "influence against random removal (clean / FGSM 4 / FGSM 8): "
               + per_trial(influence, random, ("clean", "fgsm4", "fgsm8"))]
    return Claim("denoising_chest", {"rows": rows}, {"denoising-cnn.md": phrases})


# -- Denoising CNNs: C&W's budget against its strength -----------------------------------------

def denoising_cw_budget(results: Path = RESULTS) -> Claim:
    """Accuracy under C&W (crafted on the trial-0 source) against iterations per search step,
    on the source itself (white-box) and on the trial-0 undefended classifier NA (black-box),
    as the page's table prints it; and how the 10-iteration run compares with the committed
    Table 1 trial-0 NA run (same settings and seeds)."""
    saved = load_runs(results, "denoising_cw_budget")
    runs = sorted(saved["runs"], key=lambda run: run["iterations"])
    searches = saved["settings"]["cw_searches"]
    rows = [f"| {run['iterations']} | {searches * run['iterations']} | "
            f"{percent(run['attacked']['source'], 0)} | {percent(run['attacked']['undefended'], 0)}"
            f" | {run['mean_l2']:.3f} | {percent(run['changed_fraction'], 0)} | "
            f"{run['seconds'] / 60:.1f} |" for run in runs]
    first, last = runs[0], runs[-1]
    table1 = next(run for run in load_runs(results, "denoising_cnn_tables")["runs"]
                  if run["table"] == 1 and run["label"] == "NA" and run["trial"] == 0)
    numbers = {
        "iterations": [run["iterations"] for run in runs],
        "source_attacked": [run["attacked"]["source"] for run in runs],
        "undefended_attacked": [run["attacked"]["undefended"] for run in runs],
        "clean_subset": first["clean"], "clean_test": first["clean_test_accuracy"],
        "table1_na_trial0": {"clean": table1["accuracy"]["clean"], "cw": table1["accuracy"]["cw"],
                             "clean_cw_subset": table1["accuracy"]["clean_cw_subset"]},
    }
    clean = (f"clean on these {first['images']} images: source "
             f"{percent(first['clean']['source'], 0)}, "
             f"NA {percent(first['clean']['undefended'], 0)}")
    strongest = (f"at {last['iterations']} iterations per search C&W leaves the source "
                 f"{percent(last['attacked']['source'], 0)} and NA "
                 f"{percent(last['attacked']['undefended'], 0)}")
    table1_line = (f"Table 1's trial-0 NA run: {percent(table1['accuracy']['clean'])} clean, "
                   f"{percent(table1['accuracy']['cw'], 0)} under C&W at 5 × 10 iterations; "
                   f"here {percent(first['clean_test_accuracy']['undefended'])} and "
                   f"{percent(first['attacked']['undefended'], 0)}")
    return Claim("denoising_cw_budget", numbers,
                 {"denoising-cnn.md": [*rows, clean, strongest, table1_line],
                  "index.md": [strongest]})


# -- ISR/ISP: the r, γ and m sweeps on one trial ------------------------------------------------

def sweep_label(run: dict[str, Any]) -> str:
    """The page's name of a sweep run's setting."""
    options = run["options"]
    if run["method"] == "isr":
        return f"ISR, m = {options['max_weight']:g}"
    if run["method"] == "isp":
        return f"ISP, r = {options['ratio']:g}, γ = {options['gamma']:g}"
    return "Naive"


def isr_isp_sweeps(results: Path = RESULTS) -> Claim:
    """The sweeps of ISR's m and ISP's r × γ (one trial, both noises), every setting as the
    page's table prints it (final-epoch test accuracy, %, ρ_test = 0 / 0.5 per noise), the
    range of ISP over its grid, and how the paper-default runs differ from Table 1's runs of
    the same trial and seeds (the size of run-to-run variation)."""
    saved = load_runs(results, "isr_isp_sweeps")
    noises = saved["settings"]["noises"]
    table1 = {(run["key"], run["noise"]): run
              for run in load_runs(results, "isr_isp_table1")["runs"] if run["trial"] == 0}
    order = {"naive": 0, "isr": 1, "isp": 2}
    runs = sorted(saved["runs"], key=lambda run: (
        order[run["method"]], [v for v in run["options"].values() if isinstance(v, float)]))
    labels = list(dict.fromkeys(sweep_label(run) for run in runs))
    final = {(sweep_label(run), run["noise"]): run["final"] for run in saved["runs"]}

    def cell(label: str, noise: str) -> str:
        found = final.get((label, noise))
        if found is None:
            return "–"
        return f"{100 * found['rho=0']:.1f} / {100 * found['rho=0.5']:.1f}"

    rows = [f"| {label} | " + " | ".join(cell(label, noise) for noise in noises) + " |"
            for label in labels]
    numbers: dict[str, Any] = {"rows": rows}
    phrases = list(rows)
    for noise in noises:
        isp = [final[label, noise]["rho=0"] for label in labels
               if label.startswith("ISP") and (label, noise) in final]
        naive = final.get(("Naive", noise))
        if not isp or naive is None:
            continue
        numbers[noise] = {"isp_range_rho0": (min(isp), max(isp)), "naive_rho0": naive["rho=0"]}
        phrases.append(f"{noise.capitalize()}: ISP {100 * min(isp):.1f}–{100 * max(isp):.1f} % "
                       f"over the grid at ρ_test = 0 (Naive {100 * naive['rho=0']:.1f} %)")
    isp_runs = [run for run in saved["runs"] if run["method"] == "isp"]
    columns = ("rho=0", "rho=0.5")
    naive_final = {run["noise"]: run["final"] for run in saved["runs"] if run["method"] == "naive"}
    above = [run["final"][c] > naive_final[run["noise"]][c] for run in isp_runs for c in columns
             if run["noise"] in naive_final]
    gammas = sorted({run["options"]["gamma"] for run in isp_runs})
    best_gamma: dict[float, int] = dict.fromkeys(gammas, 0)
    groups = {(run["noise"], run["options"]["ratio"]) for run in isp_runs}
    for noise, ratio in groups:
        group = [run for run in isp_runs
                 if run["noise"] == noise and run["options"]["ratio"] == ratio]
        for column in columns:
            top = max(run["final"][column] for run in group)
            for run in group:
                if run["final"][column] == top:
                    best_gamma[run["options"]["gamma"]] += 1
    delta = {gamma: [run["method_summary"]["delta_abs_mean"] for run in isp_runs
                     if run["options"]["gamma"] == gamma] for gamma in gammas}
    numbers.update(isp_above_naive=(sum(above), len(above)), best_gamma_count=best_gamma,
                   comparisons=2 * len(groups), delta_abs_mean=delta)
    phrases += [
        f"ISP is above Naive in {sum(above)} of {len(above)} (setting, test set) cells",
        "the most accurate γ of a (noise, r, ρ_test) row: " + ", ".join(
            f"γ = {gamma:g} in {count}" for gamma, count in best_gamma.items())
        + f" of {2 * len(groups)} (ties count for each)",
        "mean |δ| of the perturbed images " + ", ".join(
            f"{min(values):.3f}–{max(values):.3f} at γ = {gamma:g}"
            for gamma, values in delta.items())]
    repeats = []
    for run in saved["runs"]:
        other = table1.get((run["key"], run["noise"]))
        if other is not None:
            repeats.append((sweep_label(run), run["noise"],
                            100 * (run["final"]["rho=0"] - other["final"]["rho=0"])))
    numbers["default_minus_table1_rho0"] = repeats
    phrases.append("; ".join(f"{label} ({noise.capitalize()}) {signed(difference)}"
                             for label, noise, difference in repeats))
    return Claim("isr_isp_sweeps", numbers, {"isr-isp.md": phrases, "index.md": [
        f"ISP is above Naive in {sum(above)} of {len(above)} (setting, test set) cells",
        f"γ = 0.01 the most accurate γ in {best_gamma.get(0.01, 0)} of {2 * len(groups)}"]})


CLAIMS: tuple[Callable[[Path], Claim], ...] = (
    mrs_influence_distillation, mrs_threshold_and_figures, mrs_sweeps, mrs_variants,
    denoising_table1_eps8, denoising_paper_tables, denoising_chest, skin_flip_detection,
    skin_paper_methods_at, isp_tumour_ratio, denoising_cw_budget, isr_isp_sweeps)


def printable(numbers: Any) -> Any:
    """``numbers`` with every dictionary key JSON can hold: a ``(seed, fold)`` pair as
    :func:`pair_name`, any other key as its text."""
    if isinstance(numbers, dict):
        return {(pair_name(k) if isinstance(k, tuple) and len(k) == 2 else
                 k if isinstance(k, str | int | float | bool) else str(k)): printable(v)
                for k, v in numbers.items()}
    if isinstance(numbers, list | tuple):
        return [printable(v) for v in numbers]
    return numbers


def page_text(path: Path) -> str:
    """A page with every run of whitespace made one space (phrases may wrap)."""
    return re.sub(r"\s+", " ", path.read_text())


def missing_phrases(results: Path = RESULTS, papers: Path = PAPERS) -> list[str]:
    """``page: phrase`` for every phrase of every claim that its page lacks."""
    missing = []
    for compute in CLAIMS:
        claim = compute(results)
        for page, phrases in claim.phrases.items():
            text = page_text(papers / page)
            missing += [f"{page}: {phrase}" for phrase in phrases
                        if re.sub(r"\s+", " ", phrase) not in text]
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a page lacks a phrase of a claim")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--papers", type=Path, default=PAPERS)
    args = parser.parse_args(argv)
    if args.check:
        missing = missing_phrases(args.results, args.papers)
        for line in missing:
            print(f"missing: {line}")
        print(f"{len(missing)} phrases missing" if missing else "every claim's phrases found")
        return 1 if missing else 0
    for compute in CLAIMS:
        claim = compute(args.results)
        print(f"## {claim.name}\n"
              f"{json.dumps(printable(claim.numbers), indent=1, ensure_ascii=False)}")
        for page, phrases in claim.phrases.items():
            for phrase in phrases:
                print(f"- {page}: {phrase}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
