"""``LabelledData``: every data form, batching, loaders re-read in order, label casting and the
errors; and the engine's results on each form against plain ``(X, y)`` tensors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

import fastinfluence as fi
from fastinfluence.labelled_data import LabelledData, class_labels

CPU = torch.device("cpu")


def pairs(n: int = 23, features: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


def read(data: LabelledData, dtype=torch.float64):
    batches = list(data.batches(CPU, dtype))
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys), [len(x) for x in xs]


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


# -- forms and batching ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tuple", "list", "dataset", "loader"])
def test_every_form_reads_every_sample_in_order(form):
    x, y = pairs()
    data = {"tuple": (x, y), "list": [x, y], "dataset": TensorDataset(x, y),
            "loader": DataLoader(TensorDataset(x, y), batch_size=5)}[form]
    wrapped = LabelledData(data, "train", batch_size=4)
    got_x, got_y, sizes = read(wrapped)
    assert torch.equal(got_x, x) and torch.equal(got_y, y)
    expected_size = 5 if form == "loader" else 4
    assert sizes == [expected_size] * (len(x) // expected_size) + [len(x) % expected_size]
    assert len(wrapped) == len(x) and wrapped.num_batches() == len(sizes)


def test_a_dataset_follows_a_batch_size_set_after_wrapping():
    x, y = pairs()
    wrapped = LabelledData(TensorDataset(x, y), "train")
    wrapped.batch_size = 6
    assert read(wrapped)[2] == [6, 6, 6, 5] and wrapped.num_batches() == 4


def test_floating_inputs_are_cast_and_integer_inputs_kept():
    x, y = pairs()
    got_x, _, _ = read(LabelledData((x, y), "train"), dtype=torch.float32)
    assert got_x.dtype == torch.float32 and torch.equal(got_x, x.float())
    tokens = torch.randint(0, 9, (len(y), 4))
    got_tokens, _, _ = read(LabelledData((tokens, y), "train"), dtype=torch.float32)
    assert torch.equal(got_tokens, tokens)


@pytest.mark.parametrize(
    "loader_options",
    [{"shuffle": True}, {"drop_last": True}, {"shuffle": True, "drop_last": True}],
)
def test_a_loader_is_read_in_dataset_order_with_every_sample(loader_options):
    x, y = pairs()
    loader = DataLoader(TensorDataset(x, y), batch_size=5, **loader_options)
    wrapped = LabelledData(loader, "train")
    for _ in range(2):
        got_x, got_y, sizes = read(wrapped)
        assert torch.equal(got_x, x) and torch.equal(got_y, y)
        assert sizes == [5, 5, 5, 5, 3]


def test_a_loader_keeps_its_collate_fn_and_a_plain_batch_sampler():
    x, y = pairs()

    def doubled(samples):
        inputs, targets = default_collate(samples)
        return 2 * inputs, targets

    sampler = BatchSampler(SequentialSampler(range(len(x))), batch_size=4, drop_last=True)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler, collate_fn=doubled)
    got_x, got_y, sizes = read(LabelledData(loader, "train"))
    assert torch.equal(got_x, 2 * x) and torch.equal(got_y, y)
    assert sizes == [4] * 5 + [3]


def test_subset_takes_indices_with_repeats_in_the_same_form():
    x, y = pairs()
    indices = torch.tensor([3, 0, 3, 22])

    def halved(samples):
        inputs, targets = default_collate(samples)
        return inputs / 2, targets

    for data in [(x, y), DataLoader(TensorDataset(x, y), batch_size=3, collate_fn=halved)]:
        part = LabelledData(data, "train").subset(indices)
        got_x, got_y, sizes = read(part)
        factor = 1 if isinstance(data, tuple) else 0.5
        assert torch.equal(got_x, factor * x[indices]) and torch.equal(got_y, y[indices])
        assert len(part) == 4
        if not isinstance(data, tuple):
            assert sizes == [3, 1]


# -- refused loaders and data sets -----------------------------------------------------------


@pytest.mark.parametrize(
    ("make_loader", "message"),
    [
        (lambda d: DataLoader(d, batch_size=None), "batch_size=None"),
        (lambda d: DataLoader(d, batch_sampler=[[0, 1], [2, 3]]), "custom batch_sampler"),
        (lambda d: DataLoader(d, batch_size=4, sampler=SubsetRandomSampler(range(10))),
         "SubsetRandomSampler"),
        (lambda d: DataLoader(d, batch_size=4, sampler=WeightedRandomSampler([1.0] * 23, 23)),
         "WeightedRandomSampler"),
        (lambda d: DataLoader(d, batch_size=4, sampler=RandomSampler(d, replacement=True)),
         "may skip, repeat or weight"),
        (lambda d: DataLoader(d, batch_size=4, sampler=RandomSampler(d, num_samples=10)),
         "may skip, repeat or weight"),
    ],
)
def test_loaders_that_cannot_be_read_in_order_are_refused(make_loader, message):
    with pytest.raises(ValueError, match=message):
        LabelledData(make_loader(TensorDataset(*pairs())), "train")


def test_iterable_datasets_are_refused():
    stream = Stream(*pairs())
    with pytest.raises(TypeError, match="train is an IterableDataset.*map-style"):
        LabelledData(stream, "train")
    with pytest.raises(TypeError, match="IterableDataset"):
        LabelledData(DataLoader(stream, batch_size=4), "val")


def test_a_dataset_without_a_length_is_refused():
    class Unsized(Dataset):
        def __getitem__(self, index):
            return torch.zeros(2), 0

    with pytest.raises(TypeError, match="map-style Dataset with __len__"):
        LabelledData(Unsized(), "train")


def test_a_loader_that_reads_a_different_count_is_an_error():
    """A collate_fn that drops samples (say, unreadable images) would bias every mean."""
    x, y = pairs()

    def without_class_zero(samples):
        return default_collate([s for s in samples if int(s[1]) != 0])

    loader = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=without_class_zero)
    with pytest.raises(ValueError, match=f"yielded {int((y != 0).sum())} samples but its "
                                         f"dataset has length {len(y)}"):
        read(LabelledData(loader, "train"))


def test_a_loader_that_reads_more_samples_fails_as_soon_as_it_does():
    x, y = pairs()

    def duplicated(samples):
        inputs, targets = default_collate(samples)
        return torch.cat([inputs, inputs]), torch.cat([targets, targets])

    batches = LabelledData(DataLoader(TensorDataset(x, y), batch_size=8, collate_fn=duplicated),
                           "train").batches(CPU, torch.float64)
    next(batches)
    with pytest.raises(ValueError, match="yielded more than 23 samples"):
        next(batches)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ((torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), ValueError, "train is empty"),
        ((torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)), ValueError, "differ in length"),
        ((torch.zeros(3, 2),), TypeError, r"\(X, y\), two tensors"),
        ((torch.tensor(1.0), torch.tensor(0)), ValueError, "leading sample dimension"),
        (torch.zeros(3, 2), TypeError, "got Tensor"),
        ((torch.full((3, 2), float("nan")), torch.zeros(3, dtype=torch.long)), ValueError,
         "train X contains 6 NaN or Inf"),
    ],
)
def test_bad_tuples_raise_clear_errors(data, error, message):
    with pytest.raises(error, match=message):
        LabelledData(data, "train")


def test_non_finite_inputs_in_a_loader_are_caught_while_reading():
    x, y = pairs()
    x[17, 1] = float("inf")
    with pytest.raises(ValueError, match="train x contains 1 NaN or Inf"):
        read(LabelledData(DataLoader(TensorDataset(x, y), batch_size=4), "train"))


# -- labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32,
                                   torch.int64])
@pytest.mark.parametrize("column", [False, True])
def test_integer_labels_of_any_dtype_and_columns_become_int64_indices(dtype, column):
    labels = torch.tensor([2, 0, 1, 1], dtype=dtype)
    given = labels[:, None] if column else labels
    result = class_labels(given, 3, "y")
    assert result.dtype == torch.int64 and torch.equal(result, torch.tensor([2, 0, 1, 1]))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (F.one_hot(torch.tensor([2, 0, 1]), 3), r"shape \(3, 3\) \(one-hot labels\? pass "
                                                 r"y.argmax\(dim=1\)\)"),
        (torch.zeros(3, 2, dtype=torch.long), r"shape \[n\] \(or \[n, 1\]\).*got shape \(3, 2\);"),
        (torch.zeros(3, 1, 1, dtype=torch.long), r"got shape \(3, 1, 1\)"),
        (torch.tensor([0.0, 1.0]), "integer class indices.*float32"),
        (torch.tensor([True, False]), "integer class indices.*bool"),
        (torch.tensor([0, 3], dtype=torch.uint8), r"labels in \[0, 3\]"),
        (torch.tensor([-1, 2], dtype=torch.int16), r"labels in \[-1, 2\]"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        class_labels(labels, 3, "y")


def test_labels_are_cast_for_tuples_when_checked_and_for_loaders_as_read():
    x, y = pairs()
    wrapped = LabelledData((x, y.to(torch.uint8)[:, None]), "train")
    wrapped.check_labels(3)
    assert torch.equal(wrapped.tensors[1], y)
    loader = LabelledData(DataLoader(TensorDataset(x, y.to(torch.int32)), batch_size=4), "val")
    loader.check_labels(3)
    _, got_y, _ = read(loader)
    assert got_y.dtype == torch.int64 and torch.equal(got_y, y)
    one_hot = LabelledData(DataLoader(TensorDataset(x, F.one_hot(y, 3)), batch_size=4), "val")
    one_hot.check_labels(3)
    with pytest.raises(ValueError, match="val y must be class indices.*one-hot"):
        read(one_hot)


def test_labels_are_left_alone_until_checked():
    """Targets of a custom loss_fn are never checked (check_labels is for cross-entropy)."""
    x, y = pairs()
    targets = F.one_hot(y, 3).double()
    for data in [(x, targets), DataLoader(TensorDataset(x, targets), batch_size=4)]:
        _, got, _ = read(LabelledData(data, "train"))
        assert torch.equal(got, targets)


# -- the engine on each form -----------------------------------------------------------------


@pytest.mark.parametrize("params", ["last", "all"])
def test_scores_from_a_shuffling_loader_are_in_dataset_order(params):
    model, train, val = make_problem("mlp", seed=3)
    expected = fi.Influence(model, train, val, params=params, damping=0.3,
                            hessian="gauss-newton")
    loader = DataLoader(TensorDataset(*train), batch_size=8, shuffle=True)
    inf = fi.Influence(model, loader, val, params=params, damping=0.3, hessian="gauss-newton")
    for _ in range(2):
        assert torch.allclose(inf.scores(), expected.scores(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(inf.scores(loader), expected.scores(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("params", ["last", "all"])
def test_a_drop_last_loader_still_counts_every_sample(params):
    model, train, val = make_problem("mlp", seed=4)
    expected = fi.Influence(model, train, val, params=params, damping=0.3,
                            hessian="gauss-newton")
    as_loader = [DataLoader(TensorDataset(*pair), batch_size=8, drop_last=True)
                 for pair in (train, val)]
    inf = fi.Influence(model, *as_loader, params=params, damping=0.3, hessian="gauss-newton")
    assert torch.allclose(inf.ihvp, expected.ihvp, rtol=1e-9, atol=1e-12)
    scores = inf.scores()
    assert scores.shape == (40,)
    assert torch.allclose(scores, expected.scores(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("params", ["last", "all"])
def test_narrow_integer_and_column_labels_give_the_int64_results(params):
    model, (x, y), val = make_problem("mlp", seed=6)
    expected = fi.Influence(model, (x, y), val, params=params, damping=0.3,
                            hessian="gauss-newton").scores()
    train_forms = [(x, y.to(torch.int32)), (x, y[:, None]),
                   DataLoader(TensorDataset(x, y.to(torch.uint8)), batch_size=7),
                   DataLoader(TensorDataset(x, y.to(torch.int16)[:, None]), batch_size=7)]
    val_forms = [(val[0], val[1].to(torch.int16)), (val[0], val[1][:, None])]
    for index, train in enumerate(train_forms):
        inf = fi.Influence(model, train, val_forms[index % 2], params=params, damping=0.3,
                           hessian="gauss-newton")
        assert torch.allclose(inf.scores(), expected, rtol=1e-9, atol=1e-12)
        assert torch.allclose(inf.scores(train), expected, rtol=1e-9, atol=1e-12)


def test_one_hot_labels_are_refused_by_the_engine():
    model, (x, y), val = make_problem("mlp", seed=6)
    with pytest.raises(ValueError, match="train y must be class indices.*one-hot"):
        fi.Influence(model, (x, F.one_hot(y, 3)), val)
    loader = DataLoader(TensorDataset(x, F.one_hot(y, 3)), batch_size=8)
    with pytest.raises(ValueError, match="one-hot"):
        fi.Influence(model, loader, val, params="all", hessian="gauss-newton")


def test_a_custom_loss_gets_its_targets_as_given():
    """The same loss on one-hot float targets and on class indices gives the same scores."""
    model, (x, y), (xv, yv) = make_problem("mlp", seed=7)

    def on_one_hot(logits, targets):
        return ((torch.softmax(logits, dim=1) - targets) ** 2).sum(dim=1)

    def on_indices(logits, targets):
        return on_one_hot(logits, F.one_hot(targets, 3).to(logits.dtype))

    expected = fi.score(model, (x, y), (xv, yv), loss_fn=on_indices, params="all",
                        hessian="gauss-newton", damping=0.3)
    one_hot = fi.score(model, (x, F.one_hot(y, 3).double()), (xv, F.one_hot(yv, 3).double()),
                       loss_fn=on_one_hot, params="all", hessian="gauss-newton", damping=0.3)
    assert torch.allclose(one_hot, expected, rtol=1e-9, atol=1e-12)


def test_iterable_data_is_refused_by_the_engine():
    model, train, val = make_problem("mlp", seed=8)
    with pytest.raises(TypeError, match="train is an IterableDataset"):
        fi.Influence(model, Stream(*train), val)
    with pytest.raises(TypeError, match="val .*IterableDataset"):
        fi.Influence(model, train, DataLoader(Stream(*val), batch_size=4))


class ReaderPids(TensorDataset):
    """``(x, y)`` with the id of the process that read the sample appended to ``x``."""

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return torch.cat([x, x.new_tensor([os.getpid()])]), y


def test_a_loader_with_workers_is_read_in_order_by_its_persistent_workers():
    x, y = pairs()
    loader = DataLoader(ReaderPids(x, y), batch_size=4, shuffle=True, num_workers=2,
                        persistent_workers=True, prefetch_factor=3)
    wrapped = LabelledData(loader, "train")
    readers = []
    for _ in range(2):
        next(wrapped.batches(CPU, torch.float64))  # an abandoned pass, as a probe makes
        got_x, got_y, _ = read(wrapped)
        assert torch.equal(got_x[:, :-1], x) and torch.equal(got_y, y)
        readers.append(set(got_x[:, -1].tolist()))
    # both workers read, in other processes, and the same two read the second pass
    assert len(readers[0]) == 2 and os.getpid() not in readers[0]
    assert readers[1] == readers[0]
