"""Influence throughput with 1 and more ranks of ``torch.distributed`` (gloo here).

Every rank builds the same ``Influence`` (the paper CNN, ``params="all"``, Gauss-Newton, CG
capped at ``--cg-max-iter``) and scores the training set; the script reports, per world size,
the seconds of construction (gradient + solve) and of scoring, the scoring throughput, the
speed-up over one rank, and the share of the time spent inside the collectives
(``all_reduce``/``all_gather``, timed by wrapping them). Each rank uses ``--threads`` threads,
so ``--ranks 1 2`` at one thread each compares one core with two::

    python benchmarks/bench_distributed.py --ranks 1 2 --threads 1 \\
        --out benchmarks/results/distributed_cpu.json

On a multi-GPU machine, the same measurement under torchrun (NCCL, one GPU per rank)::

    torchrun --nproc_per_node 8 benchmarks/bench_distributed.py --device cuda --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastinfluence as fi
from fastinfluence.models import PaperCNN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--cg-max-iter", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.size < 32 or args.size % 32:
        parser.error("--size must be a positive multiple of 32 (five 2x2 pools)")
    return args


class CollectiveClock:
    """Wraps ``all_reduce`` and ``all_gather`` of ``torch.distributed`` to add up their time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def __enter__(self) -> CollectiveClock:
        for name, original in self.originals.items():
            setattr(dist, name, self._timed(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(dist, name, original)

    def _timed(self, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def measure(args: argparse.Namespace) -> dict:
    """The measurement on this rank (every rank runs it; rank 0's numbers are reported)."""
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = PaperCNN(image_size=args.size).to(device).eval()
    n = args.n_train + args.n_val
    X = torch.rand(n, 1, args.size, args.size, generator=generator).to(device)
    y = torch.randint(0, 3, (n,), generator=generator).to(device)
    train, val = (X[: args.n_train], y[: args.n_train]), (X[args.n_train:], y[args.n_train:])
    options = {"params": "all", "hessian": "gauss-newton", "solver": "cg",
               "max_iter": args.cg_max_iter}
    with warnings.catch_warnings():  # the capped CG warns: s is what it is, for every world
        warnings.simplefilter("ignore", RuntimeWarning)
        fi.Influence(model, (train[0][:8], train[1][:8]), val, **options).scores()  # warm-up
        with CollectiveClock() as clock:
            start = time.perf_counter()
            inf = fi.Influence(model, train, val, **options)
            construction = time.perf_counter() - start
            construction_collectives = clock.seconds
            times, collective = [], []
            for _ in range(args.repeats):
                before = clock.seconds
                start = time.perf_counter()
                scores = inf.scores()
                times.append(time.perf_counter() - start)
                collective.append(clock.seconds - before)
    scoring = statistics.median(times)
    return {
        "world_size": inf.report.world_size,
        "scoring": inf.report.scoring,
        "construction_seconds": construction,
        "construction_collective_share": construction_collectives / construction,
        "scoring_seconds": scoring,
        "scoring_collective_share": statistics.median(collective) / scoring,
        "samples_per_second": args.n_train / scoring,
        "score_checksum": float(scores.double().sum()),
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = measure(args)
        dist.barrier()  # no rank tears the group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def spawned(world: int, args: argparse.Namespace, scratch: Path) -> dict:
    """``measure`` on ``world`` gloo ranks on this machine (one process for ``world = 1``)."""
    if world == 1:
        return measure(args)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = scratch / f"world{world}.json"
    mp.start_processes(worker, args=(world, port, args, str(out)), nprocs=world,
                       start_method="spawn")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if "RANK" in os.environ:  # launched by torchrun: measure this world as it is
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        try:
            result = measure(args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(result, indent=2))
        return result
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    runs = {str(world): spawned(world, args, scratch) for world in args.ranks}
    base = runs[str(min(args.ranks))]
    for result in runs.values():
        result["scoring_speed_up"] = base["scoring_seconds"] / result["scoring_seconds"]
        result["construction_speed_up"] = (base["construction_seconds"]
                                           / result["construction_seconds"])
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "load_average": os.getloadavg()}
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
