"""Memory flat in n (docs/guide/scaling.md, "Memory"): a map-style Dataset — here over a numpy
memory-mapped file — streams through every stage of ``Influence`` and gives the numbers of the
same data held as tensors; the stages that hold ``[n, p]`` or ``p × p`` work in chunks or
refuse what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import make_problem
from torch.utils.data import DataLoader, Dataset

import fastinfluence as fi
from fastinfluence import labelled_data, reference, scoring
from fastinfluence.hessian import solvers
from fastinfluence.labelled_data import LabelledData

DAMPING = 0.1


class MemmapImages(Dataset):
    """``(x, y)`` pairs read one at a time from a ``.npy`` file mapped into memory."""

    def __init__(self, path, labels: torch.Tensor) -> None:
        self.images = np.load(path, mmap_mode="r")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[index])), self.labels[index]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The float64 CNN problem, its training set as tensors and as a memmap Dataset."""
    model, train, val = make_problem("cnn")
    path = tmp_path_factory.mktemp("memmap") / "train.npy"
    np.save(path, train[0].numpy())
    return model, train, MemmapImages(path, train[1]), val


KRONECKER_LAYERS = ["0", "5"]  # the convolution and the Linear head (BatchNorm has no factors)
CASES = {
    "gauss-newton cg": dict(params="all", hessian="gauss-newton", solver="cg"),
    "exact cg": dict(params="all", hessian="exact", solver="cg", damping=1.0),
    "gauss-newton lissa minibatches": dict(params="all", hessian="gauss-newton",
                                           solver="lissa", minibatch_size=8, depth=30,
                                           repeats=2),
    "kfac": dict(params=KRONECKER_LAYERS, hessian="kfac"),
    "ekfac": dict(params=KRONECKER_LAYERS, hessian="ekfac"),
    "ekfac-preconditioned cg": dict(params=KRONECKER_LAYERS, hessian="gauss-newton",
                                    solver="cg", preconditioner="ekfac"),
    "curvature on a subsample": dict(params="all", hessian="gauss-newton", solver="cg",
                                     curvature_samples=17, curvature_seed=3),
}


def _influence(model, train, val, options):
    return fi.Influence(model, train, val, **{"damping": DAMPING, "batch_size": 8, **options})


@pytest.mark.filterwarnings("ignore:lissa solve did not reach:RuntimeWarning")  # few steps
@pytest.mark.parametrize("case", CASES)
def test_a_memmap_dataset_gives_the_numbers_of_tensors(cnn, case):
    model, tensors, dataset, val = cnn
    expected = _influence(model, tensors, val, CASES[case])
    streamed = _influence(model, DataLoader(dataset, batch_size=8), val, CASES[case])
    # The same batches in the same order: bit-identical, not merely close.
    assert torch.equal(streamed.ihvp, expected.ihvp)
    assert torch.equal(streamed.scores(), expected.scores())
    test = (val[0][:3], val[1][:3])
    assert torch.equal(streamed.pairwise(test), expected.pairwise(test))


def test_every_query_streams_from_a_memmap_dataset_and_out(cnn, tmp_path):
    """Scores, self-influence and pairwise of a memmap Dataset, whole and through out= in
    chunks, against the tensors' (exact Gauss-Newton, direct solver: rounding only)."""
    model, tensors, dataset, val = cnn
    options = dict(params="all", hessian="gauss-newton", solver="direct")
    expected = _influence(model, tensors, val, options)
    streamed = _influence(model, dataset, val, options)
    test = (val[0][:3], val[1][:3])
    for name, compute in [("scores", lambda inf, **kw: inf.scores(**kw)),
                          ("self-influence", lambda inf, **kw: inf.self_influence(**kw)),
                          ("pairwise", lambda inf, **kw: inf.pairwise(test, **kw))]:
        want = compute(expected)
        torch.testing.assert_close(compute(streamed), want, rtol=1e-10, atol=1e-14)
        written = compute(streamed, out=tmp_path / name, chunk_size=16)
        torch.testing.assert_close(written, want, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(fi.read_output(tmp_path / name, name), written)


def test_the_streamed_scores_are_the_oracles(cnn):
    """The exact Hessian's scores of the memmap Dataset against the textbook solve."""
    model, tensors, dataset, val = cnn
    streamed = _influence(model, dataset, val, {**CASES["exact cg"], "tol": 1e-12}).scores()
    expected = reference.influence_scores(model, list(model.parameters()), tensors, val,
                                          damping=1.0)
    torch.testing.assert_close(streamed, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_self_influence_solves_its_gradients_in_chunks(cnn, monkeypatch, solver):
    """Above the budget, ``[n, p]`` gradients are never built whole: chunks of rows, each
    solved alone, with the unchunked values and one report of every chunk."""
    model, tensors, dataset, val = cnn
    influence = _influence(model, dataset, val, dict(params="all", solver=solver,
                                                     hessian="gauss-newton"))
    whole = influence.self_influence()
    rows = 7
    monkeypatch.setattr(scoring, "SELF_INFLUENCE_BUDGET", rows * influence.backend.dim * 8)
    lengths = []
    gradients = influence.backend.per_sample_gradients
    monkeypatch.setattr(influence.backend, "per_sample_gradients",
                        lambda data: lengths.append(len(data)) or gradients(data))
    chunked = influence.self_influence()
    assert lengths == [7] * 5 + [5]
    torch.testing.assert_close(chunked, whole, rtol=1e-6 if solver == "cg" else 1e-10, atol=0)
    if solver == "cg":
        assert influence.report.query_solve.converged
        assert influence.report.query_solve.hessian_products >= 6  # every chunk's solve


@pytest.mark.parametrize("solver", ["direct", "woodbury"])
def test_in_memory_solvers_refuse_a_matrix_larger_than_the_device(cnn, monkeypatch, solver):
    model, tensors, _, val = cnn
    monkeypatch.setattr(solvers, "device_memory_bytes", lambda device: 2**10)
    instead = "use solver='cg'" if solver == "direct" else "use solver='direct'.* or 'cg'"
    with pytest.raises(ValueError, match=rf"solver='{solver}'.*more than the .* GiB of memory "
                                         rf"of cpu; {instead}"):
        _influence(model, tensors, val, dict(params="all", hessian="gauss-newton",
                                             solver=solver))


def test_the_device_memory_is_read():
    memory = solvers.device_memory_bytes(torch.device("cpu"))
    assert memory is None or memory > 2**20


def test_tensors_are_checked_for_nan_in_blocks_of_rows(monkeypatch):
    """A large (memory-mapped) tensor is never masked whole; every block is counted."""
    monkeypatch.setattr(labelled_data, "CHECK_BLOCK_NUMBERS", 64)
    checked = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checked.append(t.numel()) or isfinite(t))
    x = torch.zeros(40, 16, dtype=torch.float64)
    x[0, 0], x[-1, -1] = float("inf"), float("nan")
    with pytest.raises(ValueError, match="train X contains 2 NaN or Inf"):
        LabelledData((x, torch.zeros(40, dtype=torch.int64)), "train")
    assert max(checked) == 64 and sum(checked) == x.numel()


def test_a_tensor_over_a_memmap_file_gives_the_numbers_of_tensors(cnn, tmp_path):
    """``(torch.from_numpy(np.load(path, mmap_mode="c")), y)``: batches are slices of the
    mapped file."""
    model, tensors, _, val = cnn
    path = tmp_path / "train.npy"
    np.save(path, tensors[0].numpy())
    mapped = (torch.from_numpy(np.load(path, mmap_mode="c")), tensors[1])
    options = CASES["gauss-newton cg"]
    expected = _influence(model, tensors, val, options).scores()
    assert torch.equal(_influence(model, mapped, val, options).scores(), expected)
