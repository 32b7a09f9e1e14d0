"""Is the all-parameter path's memory flat in the number of training samples?

For each ``n``, in a fresh subprocess (so that each peak is its own): ``n`` seeded random
single-channel 32×32 images (three classes, as the brain-tumour slices) in a float32 ``.npy``
file, written block by block by the parent and never held whole; a map-style ``Dataset`` over
that file; then ``Influence(model, dataset, val, params="all", hessian="gauss-newton",
solver="cg", max_iter=...)`` and ``.scores()`` on the paper CNN at 32² (random weights,
float32). The child records its peak resident memory (``ru_maxrss``) after start-up (torch,
the model, the validation tensors), after ``Influence`` and after ``scores``, and the seconds
of each stage. CG is capped at a few iterations: the memory of a pass over the data is what is
measured (every CG iteration is one more such pass), and a solve that stops early warns.

The dataset reads rows by positional reads (``--reader file``, the default): a memory-mapped
file (``--reader memmap``, ``np.load(mmap_mode="r")``) streams just as well, but every page it
touches stays mapped in the process and counts in its resident memory (clean file pages, which
the kernel reclaims under pressure), so its ``ru_maxrss`` grows by the file's size whatever the
library holds.

    python benchmarks/bench_memory.py --sizes 5000 50000 --out benchmarks/results/memory_cpu.json
    python benchmarks/bench_memory.py --summary benchmarks/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
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
from torch.utils.data import Dataset

IMAGE_SIDE = 32
CLASSES = 3
WRITE_BLOCK = 1024
"""Images generated and written per block by the parent."""
TARGET_RATIO = 1.10
"""Peak resident memory at the largest ``n`` over the smallest: at most this."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=1, help="CG iterations (capped)")
    parser.add_argument("--channels", type=int, nargs=5, default=[32, 32, 64, 64, 64],
                        help="the paper CNN's channels per block (default: the paper's)")
    parser.add_argument("--reader", choices=("file", "memmap"), default="file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--summary", type=Path, default=None,
                        help="run nothing: print the markdown table of a saved report")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.sizes):
        parser.error("--sizes must be >= 2")
    return args


def write_images(path: Path, n: int, seed: int = 0) -> None:
    """``n`` seeded random images ``[n, 1, 32, 32]`` (float32 in ``[0, 1]``) in ``path``
    (``.npy``) and their labels beside it, written block by block."""
    shape = (n, 1, IMAGE_SIDE, IMAGE_SIDE)
    generator = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        for start in range(0, n, WRITE_BLOCK):
            count = min(WRITE_BLOCK, n - start)
            handle.write(generator.random((count, *shape[1:]), dtype=np.float32).tobytes())
    np.save(labels_path(path), generator.integers(0, CLASSES, n).astype(np.int64))


def labels_path(path: Path) -> Path:
    return path.with_name(path.stem + "-labels.npy")


class NpyImages(Dataset):
    """``(image, label)`` pairs of an ``.npy`` image file: each image read on its own, by a
    positional read (``reader="file"``) or from a memory map of the file (``"memmap"``)."""

    def __init__(self, path: Path, reader: str) -> None:
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)  # written by write_images: format 1.0
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            self.offset = handle.tell()
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.sample_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.labels = torch.from_numpy(np.load(labels_path(path)))
        self.reader = reader
        if reader == "memmap":
            self.images = np.load(path, mmap_mode="r")
        else:
            self.descriptor = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reader == "memmap":
            image = np.array(self.images[index])
        else:
            raw = os.pread(self.descriptor, self.sample_bytes,
                           self.offset + index * self.sample_bytes)
            image = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape[1:]).copy()
        return torch.from_numpy(image), self.labels[index]


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``n`` in this process: the stages' peak memory and seconds."""
    import fastinfluence as fi
    from fastinfluence.models import PaperCNN

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = PaperCNN(image_size=IMAGE_SIDE, in_channels=1, num_classes=CLASSES,
                     channels=tuple(spec["channels"])).eval()
    generator = torch.Generator().manual_seed(1)
    val = (torch.rand(spec["n_val"], 1, IMAGE_SIDE, IMAGE_SIDE, generator=generator),
           torch.randint(0, CLASSES, (spec["n_val"],), generator=generator))
    train = NpyImages(Path(spec["path"]), spec["reader"])
    model(val[0][:2])  # one forward pass: torch's lazily allocated state before the baseline
    result: dict[str, Any] = {"n": len(train), "start_rss_mib": peak_rss_mib()}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cg solve did not reach")
        influence = fi.Influence(model, train, val, params="all", hessian="gauss-newton",
                                 solver="cg", max_iter=spec["max_iter"])
    result["influence_seconds"] = time.perf_counter() - start
    result["influence_rss_mib"] = peak_rss_mib()
    start = time.perf_counter()
    scores = influence.scores()
    result["scores_seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()
    report = influence.report
    result.update(
        stage_seconds={stage: round(seconds, 3) for stage, seconds in report.seconds.items()},
        num_params=report.num_params, batch_size=influence.batch_size,
        cg_iterations=report.solve.iterations, hessian_products=report.solve.hessian_products,
        scoring=report.scoring, finite=bool(torch.isfinite(scores).all()),
        file_mib=os.path.getsize(spec["path"]) / 2**20,
    )
    # Per training sample: each Gauss-Newton product is one pass, the scores another.
    result["product_us_per_sample"] = (1e6 * report.seconds["solve"]
                                       / report.solve.hessian_products / len(train))
    result["scores_us_per_sample"] = 1e6 * result["scores_seconds"] / len(train)
    return result


def run_size(n: int, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Write the images of ``n`` and measure them in a fresh subprocess."""
    path = directory / f"images-{n}.npy"
    write_images(path, n)
    spec = {"path": str(path), "n_val": args.n_val, "max_iter": args.max_iter,
            "reader": args.reader, "threads": args.threads, "channels": args.channels}
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                               capture_output=True, text=True, check=False)
    path.unlink()
    labels_path(path).unlink()
    if completed.returncode != 0:
        raise RuntimeError(f"the worker for n = {n} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.summary is not None:
        print(table(json.loads(args.summary.read_text())))
        return {}
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as directory:
        for n in args.sizes:
            runs.append(run_size(n, args, Path(directory)))
            print(json.dumps(runs[-1]), flush=True)
    smallest, largest = min(runs, key=lambda r: r["n"]), max(runs, key=lambda r: r["n"])
    ratio = largest["peak_rss_mib"] / smallest["peak_rss_mib"]
    report = {
        "config": {
            "command": "python benchmarks/bench_memory.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "model": f"PaperCNN at {IMAGE_SIDE}², channels {args.channels}, float32, random "
                     "weights",
            "params": "all", "hessian": "gauss-newton", "solver": "cg",
            "max_iter": args.max_iter, "n_val": args.n_val, "reader": args.reader,
            "threads": args.threads, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
        "runs": runs,
        "peak_rss_ratio": ratio,
        "target": f"peak RSS at n = {largest['n']} within {TARGET_RATIO - 1:.0%} of "
                  f"n = {smallest['n']}",
        "target_met": ratio <= TARGET_RATIO,
    }
    print(table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict[str, Any]) -> str:
    """The markdown table of a report (what ran, one row per ``n``, the peak ratio)."""
    config = report["config"]
    lines = [f"{config['model']}, p = {report['runs'][0]['num_params']:,}, CG capped at "
             f"{config['max_iter']} iteration(s), {config['threads']} thread(s), "
             f"{config['reader']} reader:", "",
             "| n | data file MiB | RSS at start MiB | peak RSS MiB | Influence s | scores s "
             "| µs per sample: product | µs per sample: scores |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in sorted(report["runs"], key=lambda r: r["n"]):
        lines.append(f"| {run['n']:,} | {run['file_mib']:.0f} | {run['start_rss_mib']:.0f} "
                     f"| {run['peak_rss_mib']:.0f} | {run['influence_seconds']:.1f} "
                     f"| {run['scores_seconds']:.1f} "
                     f"| {run['product_us_per_sample']:.0f} "
                     f"| {run['scores_us_per_sample']:.0f} |")
    lines.append(f"\nPeak RSS ratio, largest n over smallest: {report['peak_rss_ratio']:.3f} "
                 f"(target ≤ {TARGET_RATIO:.2f}: {'met' if report['target_met'] else 'missed'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
