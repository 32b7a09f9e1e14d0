"""How the all-parameter paths scale with the number of training samples n, beside Kronfluence
and TRAK: seconds and peak memory per stage, and agreement with the exact scores.

**Problem.** Brain-tumour slices at 32² from the embedded generator
(:func:`fastinfluence.datasets.brain_tumour.make_brain_tumour`): ``--base-images`` distinct
slices (and ``--n-val`` more, held out as the validation set / queries). Larger training sets
are the base slices **replicated with deterministic augmentation**: copy ``r`` of slice ``b``
(sample ``i = r·B + b``) is flipped left–right when ``r`` is odd and shifted by
``((r // 2) % 5 − 2, (r // 10) % 5 − 2)`` pixels (``torch.roll``), so 50 copies are distinct
images and no randomness is involved. Models: the paper CNN
(:class:`fastinfluence.models.PaperCNN`, channels ``--cnn-channels``) and the compact ResNet-18
(:func:`fastinfluence.models.resnet18`, ``stem="small"``, ``--resnet-width``), trained once
per model on the base slices (``bench_influence.train_briefly``, ``--train-steps`` Adam steps)
and cached, float32, eval mode, 1 thread.

**θ_S.** Every Linear and Conv2d parameter: the layers the gradient store and Kronfluence read
(BatchNorm's affine parameters, under 1 % of p, are left out of every method, so that all
methods score the same parameters; TRAK differentiates every parameter, its own convention).

**Methods** (each at every n, in a fresh subprocess, ``--methods``; at each n in the order
of :data:`METHODS`, the cheaper first):

* ``cg``: ``Influence(params=θ_S, hessian="gauss-newton", solver="cg")``, plain CG to the true
  relative residual ``--cg-tol`` (at most ``--cg-max-iter`` products): exact to the tolerance
  where it converges. Stages: ``curvature`` (building the backend), ``solve`` (validation
  gradient, CG), ``scoring`` (``scores()``).
* ``pcg``: the same with ``preconditioner=--preconditioner`` (its factor passes fall in
  ``solve``).
* ``woodbury``: ``solver="woodbury"`` on a float64 copy: **the exact scores**, by the Woodbury
  identity through the ``n·K × p`` Jacobian rows (``K = C − 1`` for softmax cross-entropy; no
  iteration), and the reference of every agreement where they fit (``--woodbury-max-gib``; it
  is refused at larger n before any work).
* ``direct``: ``solver="direct"`` in the model's float32: the exact path at every n, a Cholesky
  factorisation of the explicit ``G + λI``, ``G`` summed from the per-sample Jacobian rows a
  chunk at a time (no iteration; memory ``p²`` whatever n), refined once with a float64
  residual; exact to its reported residual (``--cg-tol`` its tolerance, as CG's), the
  reference of the agreement where Woodbury's rows do not fit. Refused where the float64
  ``p × p`` would pass ``--direct-max-gib``.
* ``subsample``: ``curvature_samples = round(--curvature-fraction · n)`` (seed 0), solved by
  ``direct`` where ``p²`` fits (in the model's float32) and by ``cg`` otherwise: the curvature
  from a subsample, the scores of all n (approximate).
* ``store``: ``GradientStore(k=--store-k)`` built (stage ``curvature``: the projected
  gradients and ``G_k`` written to disk in chunks), then ``top_influences`` of the validation
  set (stage ``scoring``: the ``K × K`` Cholesky and a streaming top-10 per query).
* ``kronfluence-ekfac``: Kronfluence's EK-FAC (``bench_peers.run_kronfluence``; stages
  ``factors`` and ``scoring``).
* ``trak``: ``traker``'s CPU Gaussian projector to ``proj_dim`` = the store's dimension ``K``
  (equal k), ``lambda_reg`` ``--trak-lambda`` (``bench_lds.trak_scores``; stages ``features``
  and ``scoring``).

Every method's scores are the influence on the mean validation loss,
``I(z_i) = −∇L_valᵀ (H + λI)^{-1}∇l(z_i)`` (for the store, Kronfluence and TRAK: the mean over
the queries of their pairwise scores, which is the same quantity by linearity; for the store
it is computed after its peak memory is read, untimed). Agreement with the exact scores at the
same n: Pearson correlation and relative error ``‖s − s_exact‖/‖s_exact‖`` (TRAK's scale is
its own: read its Pearson only).

**Measurement.** Each method × n runs in a fresh interpreter; its peak RSS is that process's
high-water mark (``VmHWM``, MiB; :func:`max_rss_mib`), read after each stage (so a stage's
value is the peak so far), with the RSS after the data and model are loaded (``baseline``:
interpreter, torch, the model, the n images; a peer's imports count in its first stage). A run
still going after ``--cap`` seconds (or at ``--deadline``) is killed and recorded ``capped``; a
method capped at one n is not started at larger n of the same model, nor one whose wall time
extrapolated linearly from its largest finished n would pass the time left (recorded ``not
run`` with the prediction). Results are appended to ``--out`` as each run ends: a stopped sweep
keeps what it measured, and the same command resumes it (runs already in the JSON are skipped;
a JSON written with other settings is refused). The scores go to ``--cache`` (for the
agreement).

**GPU** (``--device cuda``, ``scripts/gpu_check.sh``'s ``scale`` step): ``resnet18-cifar``,
CIFAR's ResNet-18 (``resnet18(10, width=--cifar-width, in_channels=3, stem="small")``: 11.2M
parameters at width 64) on synthetic CIFAR-shaped images (:func:`synthetic_images`, replicated
as above), trained on the GPU; the store, exact CG (and the other engine methods) only, stages
timed after ``torch.cuda.synchronize`` and the peak GPU memory per stage in ``gpu_mib``.

    python benchmarks/bench_scale.py --deadline 22:30       # the sweep, resumable
    python benchmarks/bench_scale.py --summary benchmarks/results/scale_cpu.json   # tables, plot
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_influence import synchronize, train_briefly
from torch import nn

HERE = Path(__file__).resolve().parent
MODELS = ("paper-cnn", "resnet18", "resnet18-cifar")
CPU_MODELS = ("paper-cnn", "resnet18")
CUDA_METHODS = ("cg", "pcg", "subsample", "store", "direct", "woodbury")
"""The methods ``--device cuda`` runs (the peers' adapters here run on the CPU)."""
METHODS = ("store", "trak", "kronfluence-ekfac", "subsample", "direct", "woodbury", "cg", "pcg")
"""In the order they run at each n: the cheaper first, so that a deadline cuts the costly."""
PEER_MODULES = {"kronfluence-ekfac": "kronfluence", "trak": "trak"}
EXACT_METHODS = ("woodbury", "direct", "cg", "pcg")
"""Methods whose scores are exact (Woodbury: to float64 round-off; direct and CG: to their
tolerance, when their solve converged), the first available the reference of the agreement."""
SETTINGS = ("device", "base_images", "n_val", "seed", "cnn_channels", "resnet_width",
            "cifar_width", "train_steps", "damping", "cg_tol", "cg_max_iter", "preconditioner",
            "curvature_fraction", "store_k", "trak_lambda", "batch_size", "threads",
            "direct_max_gib")
"""The arguments that determine a run's numbers: a JSON written with others is refused."""
TIME_TOLERANCE = 0.2
"""Target: seconds per sample constant within ±20 % from 5k to 50k."""
MIN_RUN_SECONDS = 30.0
"""No run starts with less time than this left before ``--deadline``."""
KRONFLUENCE_TIME_RATIO = 3.0
"""Target: the exact path at the largest n within 3× of Kronfluence EK-FAC's seconds."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CPU_MODELS), choices=MODELS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 50000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--base-images", type=int, default=1000,
                        help="distinct generated slices (larger n: augmented copies)")
    parser.add_argument("--n-val", type=int, default=64, help="validation samples / queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cnn-channels", type=int, nargs=5, default=[8, 8, 16, 16, 16])
    parser.add_argument("--resnet-width", type=int, default=8)
    parser.add_argument("--cifar-width", type=int, default=64,
                        help="resnet18-cifar's first-stage width (64: ResNet-18, 11.2M "
                             "parameters)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--cg-tol", type=float, default=1e-4)
    parser.add_argument("--cg-max-iter", type=int, default=200)
    parser.add_argument("--preconditioner", choices=["kfac", "ekfac"], default="kfac")
    parser.add_argument("--curvature-fraction", type=float, default=0.1,
                        help="subsample: m = round(fraction · n) curvature samples")
    parser.add_argument("--store-k", type=int, default=8)
    parser.add_argument("--trak-lambda", type=float, default=0.0)
    parser.add_argument("--woodbury-max-gib", type=float, default=2.5,
                        help="largest float64 n·C × p Jacobian the woodbury reference builds "
                             "(larger n: refused before any work, recorded as failed)")
    parser.add_argument("--direct-max-gib", type=float, default=4.0,
                        help="largest float64 p × p matrix the direct solve builds (direct, "
                             "and subsample's choice of direct over cg)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cap", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--deadline", default=None, metavar="HH:MM",
                        help="UTC time no run may pass (the next one: today's, or "
                             "tomorrow's once today's has passed; its cap is cut to it)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the runs (one with the peers installed; "
                             "the slices are generated by this one, which needs nilearn)")
    parser.add_argument("--cache", type=Path, default=HERE / "results" / "scale_cache")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale_cpu.json")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default: the JSON's name with .png")
    parser.add_argument("--summary", type=Path, default=None, metavar="JSON",
                        help="run nothing: print the tables of a saved report and redraw "
                             "its plot")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("base_images", "n_val", "train_steps", "cg_max_iter", "store_k",
                 "batch_size", "threads", "resnet_width", "cifar_width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.sizes):
        parser.error("--sizes must be >= 1")
    if not 0 < args.curvature_fraction <= 1:
        parser.error("--curvature-fraction must be in (0, 1]")
    if args.damping <= 0 or args.cap <= 0:
        parser.error("--damping and --cap must be > 0")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False on this machine "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        if set(args.methods) - set(CUDA_METHODS):
            parser.error(f"--device cuda runs {', '.join(CUDA_METHODS)} only (the peers run on "
                         "the CPU here)")
    if args.deadline is not None:
        args.deadline_at = deadline_of(args.deadline, parser)
    args.plot = args.plot or (args.summary or args.out).with_suffix(".png")
    return args


def deadline_of(text: str, parser: argparse.ArgumentParser,
                now: datetime.datetime | None = None) -> float:
    """The next ``HH:MM`` UTC (today's, or tomorrow's once today's has passed: a sweep started
    at 23:50 with ``--deadline 01:30`` runs past midnight) as a Unix time."""
    try:
        clock = datetime.datetime.strptime(text, "%H:%M").time()
    except ValueError:
        parser.error(f"--deadline must be HH:MM (UTC), got {text!r}")
    now = now or datetime.datetime.now(datetime.UTC)
    deadline = datetime.datetime.combine(now.date(), clock, datetime.UTC)
    if deadline <= now:
        deadline += datetime.timedelta(days=1)
    return deadline.timestamp()


# ----------------------------------------------------------------------------- problem


def base_slices(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``base_images + n_val`` standardised 32² slices and labels (cached: generating them
    takes ~17 ms each)."""
    path = args.cache / f"slices-{args.base_images}-{args.n_val}-{args.seed}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["images"], saved["labels"]
    from fastinfluence.datasets.brain_tumour import make_brain_tumour

    n = args.base_images + args.n_val
    data = make_brain_tumour(n_slices=n, n_patients=min(120, n), image_size=32, seed=args.seed,
                             progress=False)
    images = data.images.float()
    images = (images - images.mean()) / images.std()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    images, labels = images[order], data.labels[order]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": images, "labels": labels}, path)
    return images, labels


def synthetic_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``base_images + n_val`` CIFAR-shaped ``[3, 32, 32]`` images of 10 classes (seeded):
    class ``c``'s smooth template (Gaussian noise on an 8×8 grid, upsampled bilinearly) plus
    per-image Gaussian noise of the same scale, standardised; labels ``i mod 10``, shuffled."""
    generator = torch.Generator().manual_seed(args.seed)
    n = args.base_images + args.n_val
    templates = torch.nn.functional.interpolate(
        torch.randn(10, 3, 8, 8, generator=generator), size=32, mode="bilinear",
        align_corners=False)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=generator)]
    images = templates[labels] + torch.randn(n, 3, 32, 32, generator=generator)
    return (images - images.mean()) / images.std(), labels


def images_of(name: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The base and validation images of model ``name``."""
    return synthetic_images(args) if name == "resnet18-cifar" else base_slices(args)


def replicate(images: torch.Tensor, labels: torch.Tensor,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples from ``B`` base images: copy ``r`` of image ``b`` is sample ``r·B + b``,
    flipped left–right when ``r`` is odd, rolled by ``((r//2) % 5 − 2, (r//10) % 5 − 2)``
    pixels (copy 0 is the image itself)."""
    base = len(labels)
    copies = []
    for r in range(math.ceil(n / base)):
        shifted = images.flip(-1) if r % 2 else images
        copies.append(torch.roll(shifted, ((r // 2) % 5 - 2 if r else 0,
                                           (r // 10) % 5 - 2 if r else 0), dims=(-2, -1)))
    return torch.cat(copies)[:n], labels.repeat(math.ceil(n / base))[:n]


def build_model(name: str, args: argparse.Namespace) -> nn.Module:
    from fastinfluence.models import PaperCNN, resnet18

    torch.manual_seed(args.seed)
    if name == "paper-cnn":
        return PaperCNN(image_size=32, num_classes=3, channels=tuple(args.cnn_channels))
    if name == "resnet18-cifar":  # CIFAR's ResNet-18: 3×3 stem, no max-pool
        return resnet18(10, width=args.cifar_width, in_channels=3, stem="small")
    return resnet18(3, width=args.resnet_width, in_channels=1, stem="small")


def trained_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The model trained ``--train-steps`` Adam steps on the base images (cached), on
    ``--device``, eval mode, with its accuracies on them and on the validation images."""
    images, labels = images_of(name, args)
    model = build_model(name, args).to(args.device)
    images, labels = images.to(args.device), labels.to(args.device)
    path = args.cache / f"{name}-{settings_hash(args)}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=args.device))
        model.eval()
    else:
        train_briefly(model, images[: args.base_images], labels[: args.base_images],
                      args.train_steps, 1e-3, torch.Generator().manual_seed(args.seed))
        torch.save(model.state_dict(), path)
    with torch.no_grad():
        correct = torch.cat([model(batch).argmax(1) for batch in images.split(512)]) == labels
    return model, {"parameters": sum(p.numel() for p in model.parameters()),
                   "train_accuracy": float(correct[: args.base_images].float().mean()),
                   "val_accuracy": float(correct[args.base_images:].float().mean())}


def problem(name: str, n: int, args: argparse.Namespace):
    """The trained model, ``n`` training samples and the validation samples."""
    model, _ = trained_model(name, args)
    images, labels = images_of(name, args)
    train = replicate(images[: args.base_images], labels[: args.base_images], n)
    val = (images[args.base_images:], labels[args.base_images:])
    return model, train, val


def selection(model: nn.Module) -> list[str]:
    """θ_S: the Linear and Conv2d modules (module docstring)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))]


# ----------------------------------------------------------------------------- worker


def max_rss_mib() -> float:
    """This process's peak resident set (MiB): ``VmHWM`` of ``/proc/self/status`` where it
    exists. ``getrusage``'s ``ru_maxrss`` is not used there: on Linux a child started by
    fork and exec inherits the parent's peak in it (measured: a coordinator at 800 MiB gave
    every fresh worker 800 MiB), so it would report the coordinator's memory, not the run's."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stage_end(peaks: dict[str, float], stage: str) -> float:
    """At the end of ``stage``: waits for queued GPU work, records the peak RSS so far (and
    the peak GPU memory so far, on CUDA) and returns the time."""
    synchronize()
    peaks[stage] = max_rss_mib()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks[f"{stage}_gpu"] = torch.cuda.max_memory_allocated() / 2**20
    return time.perf_counter()


def run_influence(method: str, model, train, val, args, peaks: dict[str, float]):
    """``cg``, ``pcg``, ``subsample``, ``direct`` or ``woodbury``: scores and seconds per stage,
    with the solve's report."""
    import fastinfluence as fi

    options: dict[str, Any] = dict(params=selection(model), hessian="gauss-newton",
                                   solver="cg", damping=args.damping, tol=args.cg_tol,
                                   max_iter=args.cg_max_iter, batch_size=args.batch_size)
    modules = dict(model.named_modules())
    dim = sum(p.numel() for name in selection(model) for p in modules[name].parameters())
    fits = dim**2 * 8 <= args.direct_max_gib * 2**30
    if method == "woodbury":  # the exact reference: float64, no iteration
        model = model.double()
        train, val = (train[0].double(), train[1]), (val[0].double(), val[1])
        options.update(solver="woodbury", max_gib=args.woodbury_max_gib)
        del options["tol"], options["max_iter"]
    if method == "direct":
        if not fits:
            raise ValueError(f"the direct solve's p × p float64 matrix (p = {dim}) is above "
                             f"--direct-max-gib {args.direct_max_gib:g}")
        options["solver"] = "direct"
        del options["max_iter"]
    if method == "pcg":
        options["preconditioner"] = args.preconditioner
    if method == "subsample":
        options["curvature_samples"] = max(1, round(args.curvature_fraction * len(train[1])))
        if fits:
            options["solver"] = "direct"
            del options["max_iter"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "cg solve did not reach", RuntimeWarning)
        influence = fi.Influence(model, train, val, **options)
    start = stage_end(peaks, "solve")
    scores = influence.scores()
    scoring = stage_end(peaks, "scoring") - start
    seconds = influence.report.seconds  # CG waits for each product: its stages are whole
    stages = {"curvature": seconds["curvature"],
              "solve": seconds["gradient"] + seconds["solve"], "scoring": scoring}
    solve = influence.report.solve
    notes = {"solver": options["solver"], "products": solve.hessian_products,
             "relative_residual": solve.relative_residual,
             "converged": solve.converged, "preconditioner_passes": solve.preconditioner_passes,
             "curvature_samples": options.get("curvature_samples", len(train[1])),
             "num_params": influence.report.num_params, "scoring_path": influence.report.scoring}
    return scores, stages, notes


def run_store(model, train, val, args, peaks: dict[str, float]):
    import fastinfluence as fi

    with tempfile.TemporaryDirectory(prefix="bench_scale_store_") as out:
        start = time.perf_counter()
        store = fi.GradientStore(model, train, k=args.store_k, out=out,
                                 params=selection(model), damping=args.damping,
                                 batch_size=args.batch_size).build()
        middle = stage_end(peaks, "curvature")
        store.top_influences(val, top=10)
        end = stage_end(peaks, "scoring")
        scores = store.pairwise(val).mean(dim=1)  # for the agreement only: untimed
    return scores, {"curvature": middle - start, "scoring": end - middle}, {"dim": store.dim}


def run_kronfluence(model, train, val, args, peaks: dict[str, float]):
    from bench_peers import run_kronfluence as kronfluence_adapter

    peer_args = argparse.Namespace(peer_batch=args.batch_size, device="cpu",
                                   damping=args.damping)
    with tempfile.TemporaryDirectory(prefix="bench_scale_kronfluence_") as tmp:
        torch.manual_seed(args.seed)  # its sampled labels
        scores, stages = kronfluence_adapter("ekfac")(model, selection(model), train, val,
                                                     peer_args, tmp)
    stage_end(peaks, "scoring")
    return scores, {"factors": stages["fit"], "scoring": stages["scoring"]}, {}


def run_trak(model, train, val, args, peaks: dict[str, float]):
    from bench_lds import TRAK_BLOCK, trak_scores

    import fastinfluence as fi

    with tempfile.TemporaryDirectory() as out:  # the store's dimension: TRAK's proj_dim
        dim = fi.GradientStore(model, (train[0][:2], train[1][:2]), k=args.store_k, out=out,
                               params=selection(model)).dim
    if dim <= TRAK_BLOCK:  # traker 0.3.2's CPU projector fails at scoring with one block
        raise ValueError(f"the store's dimension {dim} (TRAK's proj_dim) must exceed "
                         f"{TRAK_BLOCK}: raise --store-k")
    seconds: dict[str, float] = {}
    scores = trak_scores([model], train, val, dim, args.trak_lambda, seconds=seconds)
    stage_end(peaks, "scoring")
    return scores.mean(dim=1), seconds, {"proj_dim": dim}


def worker(spec: dict[str, Any]) -> None:
    """One method at one n: writes its result (and scores) to ``spec["result"]``."""
    args = parse_args(spec["argv"])
    torch.set_num_threads(args.threads)
    method, result = spec["method"], Path(spec["result"])
    library = PEER_MODULES.get(method)
    if library is not None and importlib.util.find_spec(library) is None:
        result.write_text(json.dumps({"status": "not installed",
                                      "reason": f"{library} is not importable"}))
        return
    model, train, val = problem(spec["model"], spec["n"], args)
    synchronize()
    peaks = {"baseline": max_rss_mib()}
    try:
        if method == "store":
            scores, stages, notes = run_store(model, train, val, args, peaks)
        elif method == "kronfluence-ekfac":
            scores, stages, notes = run_kronfluence(model, train, val, args, peaks)
        elif method == "trak":
            scores, stages, notes = run_trak(model, train, val, args, peaks)
        else:
            scores, stages, notes = run_influence(method, model, train, val, args, peaks)
    except Exception as error:  # a failure is a result to report, not a crash
        result.write_text(json.dumps({"status": "failed",
                                      "reason": f"{type(error).__name__}: {error}"}))
        return
    np.save(spec["scores"], scores.detach().double().cpu().numpy())
    rss = {stage: mib for stage, mib in peaks.items() if not stage.endswith("_gpu")}
    gpu = {stage[:-4]: mib for stage, mib in peaks.items() if stage.endswith("_gpu")}
    result.write_text(json.dumps({"status": "ok", "stages": stages, "notes": notes,
                                  "rss_mib": rss, "peak_rss_mib": max(rss.values()),
                                  **({"gpu_mib": gpu} if gpu else {})}))


# ----------------------------------------------------------------------------- coordinator


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in SETTINGS}


def settings_hash(args: argparse.Namespace) -> str:
    return hashlib.sha256(json.dumps(settings_of(args), sort_keys=True).encode()).hexdigest()[:12]


def run_key(model: str, n: int, method: str) -> str:
    return f"{model}/{n}/{method}"


def scores_path(args: argparse.Namespace, key: str) -> Path:
    return args.cache / f"scores-{settings_hash(args)}-{key.replace('/', '-')}.npy"


def launch(model: str, n: int, method: str, args: argparse.Namespace, argv: list[str],
           cap: float) -> dict[str, Any]:
    """One run in a fresh interpreter, killed after ``cap`` seconds."""
    key = run_key(model, n, method)
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        result = Path(tmp) / "result.json"
        spec = json.dumps({"model": model, "n": n, "method": method, "argv": argv,
                           "result": str(result), "scores": str(scores_path(args, key))})
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join(
                   [str(HERE.parent), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        start = time.perf_counter()
        log = Path(tmp) / "stderr.log"
        with open(log, "w") as stderr:
            process = subprocess.Popen([args.python, str(Path(__file__).resolve()),
                                        "--worker", spec], stderr=stderr, env=env)
            try:
                process.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                return {"status": "capped", "cap_seconds": round(cap, 1)}
        wall = time.perf_counter() - start
        if not result.exists():
            tail = log.read_text()[-600:]
            return {"status": "failed", "reason": f"worker exited {process.returncode}: {tail}"}
        entry = json.loads(result.read_text())
    entry["wall_seconds"] = wall
    if "stages" in entry:
        entry["seconds"] = sum(entry["stages"].values())
    return entry


def agreement(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Pearson and relative error of every run against the exact scores at its n (the first of
    :data:`EXACT_METHODS` there that converged), filled in where both exist."""
    for key, entry in report["runs"].items():
        model, n, method = key.split("/")
        exact = next((m for m in EXACT_METHODS
                      if report["runs"].get(run_key(model, int(n), m), {}).get("notes", {})
                      .get("converged")), None)
        entry.pop("agreement", None)
        if entry.get("status") != "ok" or exact is None:
            continue
        path, reference = (scores_path(args, key),
                           scores_path(args, run_key(model, int(n), exact)))
        if not (path.exists() and reference.exists()):
            continue
        a, b = torch.from_numpy(np.load(path)), torch.from_numpy(np.load(reference))
        entry["agreement"] = {"exact": exact, "pearson": float(torch.corrcoef(
            torch.stack([a, b]))[0, 1]), "relative_error": float((a - b).norm() / b.norm())}


def predicted_seconds(report: dict[str, Any], model: str, method: str,
                      n: int) -> float | None:
    """The wall seconds of ``method`` at ``n`` extrapolated linearly from its largest finished
    smaller n (``None``: none finished)."""
    done = [(int(key.split("/")[1]), entry["wall_seconds"]) for key, entry in report["runs"].items()
            if key.startswith(f"{model}/") and key.endswith(f"/{method}")
            and entry.get("status") == "ok" and int(key.split("/")[1]) < n]
    if not done:
        return None
    size, seconds = max(done)
    return seconds * n / size


def load_report(args: argparse.Namespace) -> dict[str, Any]:
    if args.out.exists():
        report = json.loads(args.out.read_text())
        if report["settings"] != settings_of(args):
            raise SystemExit(f"{args.out} was written with other settings "
                             f"({report['settings']}); use another --out")
        return report
    return {"settings": settings_of(args), "runs": {}, "models": {}}


def save(report: dict[str, Any], args: argparse.Namespace) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return {}
    if args.summary is not None:
        report = json.loads(args.summary.read_text())
        print(summary_text(report))
        plot(report, args.plot)
        return report
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    report = load_report(args)
    report["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "cpu_count": os.cpu_count(),
                             "load_average": list(os.getloadavg())}
    worker_argv = [*argv]
    for model in args.models:
        _, trained = trained_model(model, args)
        report["models"][model] = trained
        print(f"{model}: {trained}", flush=True)
        capped_at: dict[str, int] = {}
        for n in sorted(args.sizes):
            for method in args.methods:
                key = run_key(model, n, method)
                previous = report["runs"].get(key, {})
                if previous.get("status") in ("ok", "capped", "failed"):
                    if previous.get("status") == "capped":
                        capped_at.setdefault(method, n)
                    continue
                cap = args.cap
                if args.deadline is not None:
                    cap = min(cap, args.deadline_at - time.time())
                predicted = predicted_seconds(report, model, method, n)
                if method in capped_at:
                    entry = {"status": "not run",
                             "reason": f"capped at n = {capped_at[method]}"}
                elif cap < min(args.cap, MIN_RUN_SECONDS):
                    entry = {"status": "not run", "reason": "deadline"}
                elif predicted is not None and predicted > cap:
                    entry = {"status": "not run", "reason": f"predicted {predicted:.0f} s "
                                                            f"(linear in n) > {cap:.0f} s left"}
                else:
                    entry = launch(model, n, method, args, worker_argv, cap)
                    entry["date"] = datetime.datetime.now(datetime.UTC).isoformat(
                        timespec="seconds")
                    if entry["status"] == "capped":
                        capped_at[method] = n
                report["runs"][key] = entry
                agreement(report, args)
                save(report, args)
                print(key, json.dumps({k: v for k, v in entry.items() if k != "notes"}),
                      flush=True)
    plot(report, args.plot)
    print(summary_text(report))
    return report


# ----------------------------------------------------------------------------- summary


def rows_of(report: dict[str, Any], model: str) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {n: entry}}`` of one model, in the methods' order."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for key, entry in report["runs"].items():
        name, n, method = key.split("/")
        if name == model:
            found.setdefault(method, {})[int(n)] = entry
    return {m: dict(sorted(found[m].items())) for m in METHODS if m in found}


def _cell(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return entry["status"] + (f" ({entry['cap_seconds']:.0f} s)" if "cap_seconds" in entry
                                  else "")
    return f"{entry['seconds']:.1f}"


def table(report: dict[str, Any], model: str) -> str:
    """Per method and n: seconds (stages), seconds per 1k samples, peak RSS (and its rise over
    the baseline), agreement with the exact scores."""
    lines = ["| method | n | seconds | stages (s) | s / 1k samples | peak RSS MiB (over "
             "baseline) | Pearson vs exact | rel. error vs exact | notes |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for method, by_n in rows_of(report, model).items():
        for n, entry in by_n.items():
            if entry["status"] != "ok":
                lines.append(f"| {method} | {n} | {_cell(entry)} | | | | | | "
                             f"{entry.get('reason', '')[:80]} |")
                continue
            stages = ", ".join(f"{k} {v:.1f}" for k, v in entry["stages"].items())
            rss = entry["rss_mib"]
            memory = f"{entry['peak_rss_mib']:.0f} (+{entry['peak_rss_mib'] - rss['baseline']:.0f})"
            agree = entry.get("agreement")
            pearson = f"{agree['pearson']:.4f}" if agree else ""
            error = (f"{agree['relative_error']:.3g}" if agree and method != "trak" else "")
            notes = entry.get("notes", {})
            note = ", ".join(
                f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in notes.items()
                if k in ("solver", "products", "relative_residual", "curvature_samples", "dim",
                         "proj_dim", "preconditioner_passes") and v)
            lines.append(f"| {method} | {n} | {entry['seconds']:.1f} | {stages} | "
                         f"{1000 * entry['seconds'] / n:.2f} | {memory} | {pearson} | {error} | "
                         f"{note} |")
    return "\n".join(lines)


def targets(report: dict[str, Any], model: str) -> list[str]:
    """The issue's targets as ratios of this run's numbers: per method, seconds per sample and
    peak RSS at its largest n over n = 5k; then per n, a table of the time ratios (against
    Kronfluence EK-FAC; the store against TRAK at equal K) and the Pearson correlations with the
    exact scores ("—": not measured at that n)."""
    rows = rows_of(report, model)
    lines = []

    def ok(method: str, n: int) -> dict[str, Any] | None:
        entry = rows.get(method, {}).get(n)
        return entry if entry and entry["status"] == "ok" else None

    for method, by_n in rows.items():
        sizes = [n for n in by_n if ok(method, n) and n >= 5000]
        if len(sizes) >= 2:
            small, large = ok(method, sizes[0]), ok(method, sizes[-1])
            per_sample = (large["seconds"] / sizes[-1]) / (small["seconds"] / sizes[0])
            memory = large["peak_rss_mib"] / small["peak_rss_mib"]
            verdict = "met" if abs(per_sample - 1) <= TIME_TOLERANCE else "missed"
            lines.append(f"- {method}: seconds per sample at n = {sizes[-1]} / n = {sizes[0]}: "
                         f"{per_sample:.2f} (target 1 ± {TIME_TOLERANCE:g}: {verdict}); peak "
                         f"RSS ratio {memory:.2f}")

    def ratio(method: str, baseline: str, n: int) -> str:
        a, b = ok(method, n), ok(baseline, n)
        return f"{a['seconds'] / b['seconds']:.2f}" if a and b else "—"

    def pearson(method: str, n: int) -> str:
        entry = ok(method, n)
        return f"{entry['agreement']['pearson']:.4f}" if entry and "agreement" in entry else "—"

    sizes = sorted({n for by_n in rows.values() for n in by_n})
    lines += ["", f"| n | direct / Kronfluence s (target ≤ {KRONFLUENCE_TIME_RATIO:g}) | "
                  "woodbury / Kronfluence s | cg / Kronfluence s | pcg / Kronfluence s | "
                  "subsample / Kronfluence s (target ≤ 1) | store / TRAK s (target < 1) | "
                  "Pearson vs exact: cg, pcg, subsample, Kronfluence | store, TRAK |",
              "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for n in sizes:
        lines.append(
            f"| {n} | {ratio('direct', 'kronfluence-ekfac', n)} | "
            f"{ratio('woodbury', 'kronfluence-ekfac', n)} | "
            f"{ratio('cg', 'kronfluence-ekfac', n)} | {ratio('pcg', 'kronfluence-ekfac', n)} | "
            f"{ratio('subsample', 'kronfluence-ekfac', n)} | {ratio('store', 'trak', n)} | "
            + ", ".join(pearson(m, n) for m in ("cg", "pcg", "subsample", "kronfluence-ekfac"))
            + " | " + ", ".join(pearson(m, n) for m in ("store", "trak")) + " |")
    return lines


def summary_text(report: dict[str, Any]) -> str:
    """The tables of every model (the docs page's measured section comes from this), after
    the dates the runs ended."""
    dates = sorted(entry["date"] for entry in report["runs"].values() if "date" in entry)
    parts = ([f"Runs ended {dates[0]} to {dates[-1]}.", ""] if dates else [])
    for model in report["models"]:
        if not rows_of(report, model):
            continue
        info = report["models"][model]
        parts += [f"### {model} (p = {info['parameters']:,}, accuracy "
                  f"{info['train_accuracy']:.3f} base / {info['val_accuracy']:.3f} val)", "",
                  table(report, model), "", *targets(report, model), ""]
    return "\n".join(parts)


def plot(report: dict[str, Any], path: Path) -> None:
    """Seconds and peak RSS against n (log–log), one line per method, one row per model
    (skipped, saying so, where matplotlib is not installed: the JSON is the result)."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib is not installed: no plot {path}", flush=True)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in report["models"] if rows_of(report, m)]
    if not models:
        return
    figure, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for method, by_n in rows_of(report, model).items():
            done = {n: e for n, e in by_n.items() if e["status"] == "ok"}
            if not done:
                continue
            sizes = list(done)
            marker = "o" if method in PEER_MODULES else "s"
            row[0].plot(sizes, [e["seconds"] for e in done.values()], marker=marker,
                        label=method)
            row[1].plot(sizes, [e["peak_rss_mib"] for e in done.values()], marker=marker,
                        label=method)
        for axis, label in zip(row, ("seconds (1 thread)", "peak RSS (MiB)"), strict=True):
            axis.set(xscale="log", yscale="log", xlabel="training samples n", ylabel=label,
                     title=model)
            axis.grid(alpha=0.3, which="both")
        if row[0].lines:
            row[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
