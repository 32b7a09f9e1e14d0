"""How strong is the denoising example's C&W attack at a given budget? Accuracy against iterations.

The denoising-CNN paper attacks with Carlini-Wagner L2 at 5 binary-search steps of 1,000
iterations; the CPU default of ``examples/denoising_cnn_tables.py`` affords 10, at which the
attack hardly moves the black-box accuracy. This example measures the curve between: it trains
that example's trial-0 source (the undefended ResNet-18 the attacks are crafted on) and its
trial-0 undefended classifier (Table 1's NA row; the same seeds, so the same weights as the
committed run when the settings are equal), then crafts C&W on the source for the first
``--cw-images`` test images at ``--cw-searches`` binary-search steps of each number of
iterations in ``--cw-iterations``, and reports for each: the accuracy of the source itself
(white-box: how often the attack succeeds), of NA (the paper's black-box setting), the mean
L2 of the perturbation, the share of images changed and the seconds.

Every other flag is the denoising example's (its settings, saved in ``runs.json``).

Outputs in ``--out``: ``runs.json`` (one run per iteration count; the same command resumes
after Ctrl-C and a later command may add iteration counts), ``table.md`` and
``figure_cw_budget.png`` (accuracy and L2 against iterations), drawn from ``runs.json`` only.

    python examples/denoising_cw_budget.py --cw-iterations 10 30 100 300   # CPU (~15 min)
    python examples/denoising_cw_budget.py --cw-iterations 1000 --cw-images 1000  # a GPU
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the denoising example beside this

import denoising_cnn_tables as denoising  # noqa: E402

from fastinfluence.experiments import (  # noqa: E402
    ExperimentCLI,
    Session,
    format_markdown_table,
    save_figure,
    setting,
)
from fastinfluence.robust.attacks import carlini_wagner_l2  # noqa: E402


@dataclass
class Settings(denoising.Settings):
    """The denoising example's settings, with ``cw_iterations`` a list: one run per value."""

    cw_iterations: list[int] = setting([10, 30, 100, 300], nargs="+", type=int,
                                       normalise=lambda values: sorted(set(values)),
                                       help="iterations per search step, one run each")


def check(settings: Settings) -> str | None:
    """What is wrong with ``settings``, if anything."""
    if min(settings.cw_iterations) < 1:
        return "--cw-iterations must be >= 1"
    if settings.cw_searches < 1 or settings.cw_images < 1:
        return "--cw-searches and --cw-images must be >= 1"
    return None


CLI = ExperimentCLI(Settings, __doc__, "examples/denoising_cw_budget.py",
                    Path("examples/results/denoising_cw_budget"), extendable=("cw_iterations",),
                    check=check)


@dataclass
class Models:
    """The trial-0 source and undefended classifier, with their clean accuracies."""

    source: torch.nn.Module
    undefended: torch.nn.Module
    clean: dict[str, float]


def train_models(settings: Settings, data: denoising.Data, device: str) -> Models:
    """The denoising example's trial-0 source and NA classifier, trained as it trains them."""
    source, source_result = denoising.train_classifier(
        "resnet18", 0.0, 0.0, settings, data, data.train, 0, device, seed_offset=1)
    undefended, result = denoising.train_classifier("resnet18", 0.0, 0.0, settings, data,
                                                    data.train, 0, device)
    return Models(source.eval(), undefended.eval(), {
        "source": source_result.final_test_accuracy, "undefended": result.final_test_accuracy})


def budget_run(models: Models, data: denoising.Data, settings: Settings, iterations: int,
               device: str) -> dict[str, Any]:
    """C&W on the source at ``iterations`` per search step, evaluated on both models."""
    count = min(settings.cw_images, len(data.test[1]))
    x, y = data.test[0][:count], data.test[1][:count]
    start = time.perf_counter()
    adversarial = carlini_wagner_l2(models.source, x, y, num_classes=len(data.class_names),
                                    binary_search_steps=settings.cw_searches,
                                    max_iter=iterations)
    seconds = time.perf_counter() - start
    norms = (adversarial - x).flatten(1).norm(dim=1)
    return {
        "iterations": iterations, "images": count, "seconds": seconds,
        "clean_test_accuracy": models.clean,
        "clean": {name: denoising.accuracy(model, x, y, device) for name, model in
                  (("source", models.source), ("undefended", models.undefended))},
        "attacked": {name: denoising.accuracy(model, adversarial, y, device) for name, model in
                     (("source", models.source), ("undefended", models.undefended))},
        "mean_l2": float(norms.mean()), "changed_fraction": float((norms > 0).double().mean()),
    }


def render_table(settings: Settings, runs: list[dict], meta: dict[str, Any]) -> str:
    """``table.md``, from what ``runs.json`` holds."""
    runs = sorted(runs, key=lambda r: r["iterations"])
    lines = [[str(r["iterations"]), str(settings.cw_searches * r["iterations"]),
              f"{100 * r['attacked']['source']:.0f} (clean {100 * r['clean']['source']:.0f})",
              f"{100 * r['attacked']['undefended']:.0f} "
              f"(clean {100 * r['clean']['undefended']:.0f})",
              f"{r['mean_l2']:.3f}", f"{100 * r['changed_fraction']:.0f}",
              f"{r['seconds']:.0f}"] for r in runs]
    clean = (f"Clean accuracy on the whole test set: source "
             f"{100 * runs[0]['clean_test_accuracy']['source']:.2f} %, NA "
             f"{100 * runs[0]['clean_test_accuracy']['undefended']:.2f} %.\n") if runs else ""
    return f"""# C&W budget against strength on the embedded {settings.dataset} data

Command: `{meta['command']}`
({len(runs)} runs, {sum(r['seconds'] for r in runs) / 60:.1f} min of C&W on {meta['machine']}.)
Settings: {json.dumps(asdict(settings))}

C&W L2 (untargeted, {settings.cw_searches} binary-search steps over the constant) crafted on the
trial-0 source for the first {settings.cw_images} test images; accuracy (%) on those images of
the source itself (white-box) and of the trial-0 undefended classifier NA (black-box, the
paper's setting). Mean L2 over the images (an image the attack fails on comes back unchanged).
{clean}
{format_markdown_table(
    ["Iterations per search", "Iterations in all", "Source (white-box)", "NA (black-box)",
     "Mean L2", "Changed (%)", "Seconds"], lines)}
"""


def draw_figure(path: Path, runs: list[dict]) -> Path:
    """Accuracy of the source and of NA, and the mean L2, against iterations per search."""
    from matplotlib.figure import Figure

    runs = sorted(runs, key=lambda r: r["iterations"])
    iterations = [r["iterations"] for r in runs]
    figure = Figure(figsize=(7.5, 3.0))
    accuracy_axes, l2_axes = figure.subplots(1, 2)
    for name, label, colour in (("source", "source (white-box)", "tab:red"),
                                ("undefended", "NA (black-box)", "tab:blue")):
        accuracy_axes.plot(iterations, [100 * r["attacked"][name] for r in runs], "o-",
                           color=colour, label=f"{label} under C&W")
        accuracy_axes.plot(iterations, [100 * r["clean"][name] for r in runs], ":",
                           color=colour, label=f"{label}, clean")
    accuracy_axes.set(xscale="log", xlabel="iterations per search step",
                      ylabel="accuracy on the attacked images (%)", ylim=(0, 100))
    accuracy_axes.legend(fontsize=7)
    l2_axes.plot(iterations, [r["mean_l2"] for r in runs], "o-", color="black")
    l2_axes.set(xscale="log", xlabel="iterations per search step", ylabel="mean L2 of δ")
    figure.suptitle(f"C&W budget against strength ({runs[0]['images']} test images)",
                    fontsize=9)
    return save_figure(figure, path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every missing iteration count, then write the table and the figure."""
    session = Session(CLI, argv, lambda record: record["iterations"], render_table)
    settings, out = session.settings, session.out
    paths: list[Path] = []
    with session:
        data = denoising.load_data(settings, session.args.progress)
        missing = [n for n in settings.cw_iterations if not session.done(n)]
        models = (train_models(settings, data, session.device)
                  if missing and not session.args.no_train else None)

        def work(iterations: int) -> None:
            if not session.done(iterations):
                session.save(budget_run(models, data, settings, iterations, session.device))

        session.run(settings.cw_iterations, work, lambda n: f"C&W {n} iterations",
                    desc="C&W budgets")
        if session.runs:
            paths.append(draw_figure(out / "figure_cw_budget.png", session.runs))
        session.finish(paths)
    return {"runs": session.runs, "paths": paths}


if __name__ == "__main__":
    main()
