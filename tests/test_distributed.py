"""Influence and the gradient store split over 2 and 3 gloo processes (loopback, spawned here)
equal one process."""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import make_problem

import fastinfluence as fi

# name: (problem, training samples, options). 23 samples and 7 validation samples make uneven
# shards; 2 training samples over 3 ranks leave rank 0 without any.
CASES = {
    "head-direct": ("mlp", 23, {"params": "last", "solver": "direct"}),
    "head-cg": ("cnn", 23, {"params": "last", "solver": "cg", "tol": 1e-12}),
    "head-lissa": ("mlp", 23, {"params": "last", "solver": "lissa", "damping": 0.5,
                               "tol": 1e-12}),
    "gauss-newton-cg": ("cnn", 23, {"params": "all", "solver": "cg", "tol": 1e-12}),
    "exact-direct": ("mlp", 23, {"params": "all", "hessian": "exact", "solver": "direct",
                                 "damping": 1.0}),
    "full-lissa": ("mlp", 23, {"params": "all", "solver": "lissa", "damping": 0.5,
                               "tol": 1e-12}),
    "minibatch-lissa": ("cnn", 23, {"params": "all", "solver": "lissa", "damping": 0.5,
                                    "minibatch_size": 8, "depth": 40}),
    "empty-shard": ("mlp", 2, {"params": "all", "solver": "direct", "damping": 0.5}),
    # K-FAC/EK-FAC factors summed over the ranks' shards: as a curvature and as CG's
    # preconditioner (the CNN's BatchNorm gets the scalar block), an empty shard included
    "kfac-direct": ("cnn", 23, {"params": ["0", "5"], "hessian": "kfac"}),
    "ekfac-direct": ("mlp", 23, {"params": "all", "hessian": "ekfac"}),
    "gauss-newton-cg-ekfac": ("cnn", 23, {"params": "all", "solver": "cg",
                                          "preconditioner": "ekfac", "tol": 1e-12}),
    "empty-shard-ekfac": ("mlp", 2, {"params": "all", "hessian": "ekfac", "damping": 0.5}),
    "empty-shard-cg-kfac": ("mlp", 2, {"params": "all", "solver": "cg", "damping": 0.5,
                                       "preconditioner": "kfac", "tol": 1e-12}),
}
TIMEOUT_S = 240


def run_case(kind: str, n_train: int, options: dict) -> dict:
    """Every query of one case; the same in one process and on every rank."""
    model, train, val = make_problem(kind, seed=5, n_train=n_train, n_val=7)
    with warnings.catch_warnings():  # the minibatch LiSSA case does not converge: no matter
        warnings.simplefilter("ignore", RuntimeWarning)
        return queries(fi.Influence(model, train, val, batch_size=4, **options), val)


def queries(inf: fi.Influence, val) -> dict:
    test = (val[0][:5], val[1][:5])
    return {
        "ihvp": inf.ihvp,
        "scores": inf.scores(),
        "scores_of_val": inf.scores(val),
        "self_influence": inf.self_influence(),
        "pairwise": inf.pairwise(test),
        "perturbation": inf.perturbation(*test),
        "world_size": inf.report.world_size,
        "iterations": inf.report.solve.iterations,
    }


def written_scores(directory: Path) -> torch.Tensor:
    """Scores through the resumable output (rank 0 writes, every rank reads them back)."""
    model, train, val = make_problem("mlp", seed=5, n_train=23, n_val=7)
    inf = fi.Influence(model, train, val, params="all", solver="direct", out=directory)
    return inf.scores(out=directory, chunk_size=5)


def store_queries(directory: Path) -> dict:
    """A gradient store's build and queries (``k < p``: a projection, but one process's);
    7 validation queries over 3 ranks make uneven query shards, 5 chunks uneven chunk
    shards."""
    model, train, val = make_problem("mlp", seed=5, n_train=23, n_val=7)
    store = fi.GradientStore(model, train, k=3, out=directory, dtype=torch.float64,
                             chunk_size=5, batch_size=4).build()
    exact = fi.Influence(model, train, val, params="all", solver="direct", batch_size=4)
    return {"curvature": store.curvature(), "pairwise": store.pairwise(val),
            "top": store.top_influences(val, top=6),
            "lowest": store.top_influences(val, top=6, largest=False),
            "exact": store.top_influences(val, top=6, exact=exact)}


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = {name: run_case(*case) for name, case in CASES.items()}
        results["written"] = written_scores(Path(out) / "resumable")
        results["store"] = store_queries(Path(out) / "store")
        dist.barrier()  # no rank tears the group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(world: int, out: Path) -> list[dict]:
    context = mp.start_processes(worker, args=(world, free_port(), str(out)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} processes did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module")
def single_process() -> dict:
    return {name: run_case(*case) for name, case in CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_single_process_results(world, tmp_path, single_process):
    ranks = spawn(world, tmp_path)
    expected_written = written_scores(tmp_path / "one-process")
    assert sorted(p.name for p in (tmp_path / "resumable").glob("scores-*.npy")) == [
        f"scores-{index:05d}.npy" for index in range(5)]
    expected_store = store_queries(tmp_path / "one-process-store")
    assert (sorted(p.name for p in (tmp_path / "store").glob("projected-*.npy"))
            == sorted(p.name for p in (tmp_path / "one-process-store").glob("projected-*.npy")))
    for rank, results in enumerate(ranks):
        gap = float((results["written"] - expected_written).norm())
        assert gap <= 1e-8 * float(expected_written.norm()), (rank, "written", gap)
        store = results["store"]
        for key in ("curvature", "pairwise"):
            torch.testing.assert_close(store[key], expected_store[key], rtol=1e-10, atol=1e-12)
        for key in ("top", "lowest", "exact"):
            indices, values = store[key]
            assert torch.equal(indices, expected_store[key][0]), (rank, key)
            torch.testing.assert_close(values, expected_store[key][1], rtol=1e-10, atol=1e-12)
        for name, expected in single_process.items():
            got = results[name]
            assert got["world_size"] == world and expected["world_size"] == 1
            # sums in another order: a CG stopping at 1e-12 may take one iteration more or less
            assert abs(got["iterations"] - expected["iterations"]) <= 1, (rank, name)
            for key in ("ihvp", "scores", "scores_of_val", "self_influence", "pairwise",
                        "perturbation"):
                scale = float(expected[key].norm())
                gap = float((got[key] - expected[key]).norm())
                assert gap <= 1e-8 * scale, (rank, name, key, gap / scale)


def test_without_torch_distributed_one_process_runs():
    model, train, val = make_problem("mlp")
    assert not dist.is_initialized()
    assert fi.Influence(model, train, val).report.world_size == 1
