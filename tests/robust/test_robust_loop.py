"""The shared loop: history, evaluation, best-validation selection, checkpoints, flips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fastinfluence.models import PaperCNN, resnet18
from fastinfluence.robust import ATConfig, ISRTrainer, NaiveTrainer, TrainConfig, Trainer
from fastinfluence.robust.loop import (
    make_optimizer,
    random_flip,
    recalibrate_batchnorm,
    split_batches,
)


def test_naive_two_epochs(model, splits):
    result = NaiveTrainer(model, TrainConfig(epochs=2, lr=1e-3, batch_size=8)).fit(*splits)
    assert [r.epoch for r in result.history] == [1, 2]
    for record in result.history:
        assert 0 <= record.val_accuracy <= 1 and 0 <= record.test_accuracy <= 1
        assert record.train_loss > 0 and record.seconds > 0
    assert not model.training


def test_same_seed_same_run(splits):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(NaiveTrainer(PaperCNN(32), TrainConfig(epochs=2, lr=1e-3, seed=3)).fit(*splits))
    assert [r.train_loss for r in runs[0].history] == [r.train_loss for r in runs[1].history]


class _Scripted(Trainer):
    """Reports scripted accuracies: validation then test, epoch after epoch."""

    def __init__(self, model, config, accuracies):
        super().__init__(model, config)
        self.accuracies = iter(accuracies)

    def accuracy(self, split):
        return next(self.accuracies)


def test_best_epoch_selected_on_validation_never_test(model, splits):
    # (val, test) per epoch: test is highest at epoch 1, validation at epochs 2 and 3 (tie).
    scripted = [0.2, 0.9, 0.7, 0.4, 0.7, 0.5, 0.6, 0.3]
    result = _Scripted(model, TrainConfig(epochs=4, lr=1e-3), scripted).fit(*splits)
    assert result.best_epoch == 2
    assert result.best_val_accuracy == 0.7
    assert result.test_accuracy_at_best_val == 0.4
    assert result.final_test_accuracy == 0.3


def test_checkpoint_after_each_epoch(model, splits, tmp_path):
    path = tmp_path / "run" / "last.pt"
    config = TrainConfig(epochs=2, lr=1e-3, checkpoint=path)
    NaiveTrainer(model, config).fit(*splits)
    saved = torch.load(path, weights_only=False)
    assert saved["epoch"] == 2 and saved["method"] == "naive"
    assert len(saved["history"]) == 2
    assert saved["config"]["checkpoint"] == str(path)
    for name, value in model.state_dict().items():
        assert torch.equal(saved["model"][name], value)


def test_random_flip_mirrors_about_half():
    x = torch.arange(200 * 4, dtype=torch.float32).reshape(200, 1, 2, 2)
    flipped = random_flip(x, torch.Generator().manual_seed(0))
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    same = (flipped == x).flatten(1).all(1)
    assert bool((mirrored ^ same).all())
    assert 70 < int(mirrored.sum()) < 130


@pytest.mark.parametrize("bad", [
    "not a pair",
    (torch.zeros(4, 32), torch.zeros(4, dtype=torch.long)),  # [n, C, L] signals are fine
    (torch.zeros(4, 1, 32, 32), torch.zeros(3, dtype=torch.long)),
    (torch.zeros(4, 1, 32, 32), torch.zeros(4)),
    (torch.full((4, 1, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long)),
])
def test_bad_split_raises(model, splits, bad):
    with pytest.raises(ValueError, match="train"):
        NaiveTrainer(model, TrainConfig(epochs=1)).fit(bad, splits[1], splits[2])


def test_wrong_config_type(model):
    with pytest.raises(TypeError, match="ISRConfig"):
        ISRTrainer(model, ATConfig())


def test_fits_once(model, splits):
    trainer = NaiveTrainer(model, TrainConfig(epochs=1, lr=1e-3))
    trainer.fit(*splits)
    with pytest.raises(RuntimeError, match="already been fitted"):
        trainer.fit(*splits)


def test_recalibrated_batchnorm_holds_the_training_mean():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU()).eval()
    images = torch.rand(12, 1, 8, 8) * 0.1 + 0.5
    recalibrate_batchnorm(model, images, 4, torch.device("cpu"))
    norm = model[1]
    with torch.no_grad():
        expected = conv(images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(norm.running_mean, expected)
    assert norm.momentum == 0.1 and not model.training


@pytest.mark.parametrize(("n", "sizes"), [(65, [32, 33]), (64, [32, 32]), (66, [32, 32, 2]),
                                          (33, [33]), (1, [1])])
def test_a_last_batch_of_one_joins_the_one_before(n, sizes):
    order = torch.randperm(n)
    batches = split_batches(order, 32)
    assert [len(b) for b in batches] == sizes
    assert torch.equal(torch.cat(batches), order)  # same order, nothing dropped


@pytest.mark.parametrize(("n", "sizes"), [(65, [32, 32, 1]), (1, [1])])
def test_a_last_batch_of_one_stays_alone_when_not_joined(n, sizes):
    order = torch.randperm(n)
    batches = split_batches(order, 32, join_single=False)
    assert [len(b) for b in batches] == sizes
    assert torch.equal(torch.cat(batches), order)


class BatchSizes(NaiveTrainer):
    """Records the size of every training batch."""

    def batch_loss(self, x, y, index):
        self.sizes.append(len(index))
        return super().batch_loss(x, y, index)


def images_32(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=generator), torch.arange(n) % 3


def test_last_training_image_alone_trains_with_batchnorm_on_a_1x1_map():
    # ResNet-18's last stage is 1×1 at 32²: a batch of one raised in train-mode BatchNorm
    torch.manual_seed(0)
    trainer = BatchSizes(resnet18(3, width=4, in_channels=1),
                         TrainConfig(epochs=2, batch_size=32, recalibrate_bn=False))
    trainer.sizes = []
    result = trainer.fit(images_32(33, 0), images_32(6, 1), images_32(6, 2))
    assert trainer.sizes == [33, 33] and len(result.history) == 2


def test_a_last_image_trains_alone_when_the_config_says_so():
    torch.manual_seed(0)
    trainer = BatchSizes(PaperCNN(32), TrainConfig(epochs=2, batch_size=32,
                                                   join_single_batch=False))
    trainer.sizes = []
    trainer.fit(images_32(33, 0), images_32(6, 1), images_32(6, 2))
    assert trainer.sizes == [32, 1, 32, 1]


def test_a_generator_passed_in_draws_the_batches_and_continues():
    """The trainer draws from the stream it is given (and leaves it advanced): two trainers
    on one stream take the batch orders a single stream yields in turn."""
    stream = torch.Generator().manual_seed(7)
    orders = []

    class Orders(NaiveTrainer):
        def batch_loss(self, x, y, index):
            orders.append(index.clone())
            return super().batch_loss(x, y, index)

    for _ in range(2):
        torch.manual_seed(0)
        Orders(PaperCNN(32), TrainConfig(epochs=1, batch_size=64, flip=False),
               generator=stream).fit(images_32(10, 0), images_32(6, 1), images_32(6, 2))
    expected = torch.Generator().manual_seed(7)
    assert [o.tolist() for o in orders] == [
        torch.randperm(10, generator=expected).tolist() for _ in range(2)]
    assert torch.equal(stream.get_state(), expected.get_state())
    with pytest.raises(TypeError, match="generator"):
        NaiveTrainer(PaperCNN(32), generator=7)


def test_recalibration_joins_a_last_image_alone_to_the_batch_before():
    torch.manual_seed(0)
    net = resnet18(3, width=4, in_channels=1).eval()
    images = images_32(33, 0)[0]
    recalibrate_batchnorm(net, images, 32, torch.device("cpu"))
    norm = net.bn1
    with torch.no_grad():
        expected = net.conv1(images).mean(dim=(0, 2, 3))  # one batch of 33, not 32 and 1
    torch.testing.assert_close(norm.running_mean, expected)


def test_recalibrate_option_runs_before_evaluation(model, splits):
    stale = TrainConfig(epochs=1, lr=1e-3, batch_size=8)
    fresh = TrainConfig(epochs=1, lr=1e-3, batch_size=8, recalibrate_bn=True)
    torch.manual_seed(0)
    NaiveTrainer(model, stale).fit(*splits)
    first_norm = model.features[1]
    before = first_norm.running_mean.clone()
    torch.manual_seed(0)
    other = PaperCNN(32)
    NaiveTrainer(other, fresh).fit(*splits)
    with torch.no_grad():
        expected = other.features[0](splits[0][0]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(other.features[1].running_mean, expected)
    assert not torch.allclose(before, expected, atol=1e-3)


class _BrightestColumn(nn.Module):
    """Predicts the brightest of three image columns, however it is trained: its one
    parameter (the optimiser needs one) enters the logits multiplied by zero."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.mean(dim=(1, 2)) + 0 * self.unused


def one_bright_column(columns, labels):
    """Images ``[n, 1, 2, 3]``, zero but for column ``columns[i]`` of image ``i``."""
    x = torch.zeros(len(columns), 1, 2, 3)
    x[torch.arange(len(columns)), 0, :, torch.tensor(columns)] = 1.0
    return x, torch.tensor(labels)


def test_several_named_test_sets_each_evaluated_every_epoch():
    train = one_bright_column([0, 1, 2, 0], [0, 1, 2, 0])
    val = one_bright_column([0, 1, 2, 2], [0, 1, 2, 0])  # 3 of 4 right
    plain = one_bright_column([0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 1, 2])  # 5 of 6 right
    # Mirrored, the bright columns are 2, 1, 0, 2, 1, 2: only samples 1, 4 and 5 stay right.
    mirrored = (plain[0].flip(-1), plain[1])
    config = TrainConfig(epochs=3, lr=0.1, batch_size=2)
    result = NaiveTrainer(_BrightestColumn(), config).fit(
        train, val, {"plain": plain, "mirrored": mirrored})
    expected = {"plain": 5 / 6, "mirrored": 3 / 6}
    for record in result.history:
        assert record.val_accuracy == pytest.approx(3 / 4)
        assert list(record.test_accuracies) == ["plain", "mirrored"]
        assert record.test_accuracies == pytest.approx(expected)
        assert record.test_accuracy == pytest.approx(5 / 6)  # the first test set
    assert result.best_epoch == 1  # the first of equal validation accuracies
    assert result.final_test_accuracies == pytest.approx(expected)
    assert result.test_accuracies_at_best_val == pytest.approx(expected)
    assert result.final_test_accuracy == result.test_accuracy_at_best_val == pytest.approx(5 / 6)


def test_named_test_sets_at_the_best_validation_epoch(model, splits):
    # (val, plain, mirrored) per epoch: validation is highest at epoch 2.
    scripted = [0.5, 0.1, 0.2, 0.8, 0.3, 0.4, 0.6, 0.5, 0.7]
    tests = {"plain": splits[2], "mirrored": (splits[2][0].flip(-1), splits[2][1])}
    result = _Scripted(model, TrainConfig(epochs=3, lr=1e-3), scripted).fit(
        splits[0], splits[1], tests)
    assert result.best_epoch == 2
    assert result.test_accuracies_at_best_val == {"plain": 0.3, "mirrored": 0.4}
    assert result.final_test_accuracies == {"plain": 0.5, "mirrored": 0.7}
    assert result.test_accuracy_at_best_val == 0.3 and result.final_test_accuracy == 0.5


def test_single_test_split_is_named_test(model, splits):
    result = NaiveTrainer(model, TrainConfig(epochs=1, lr=1e-3)).fit(*splits)
    assert list(result.final_test_accuracies) == ["test"]


@pytest.mark.parametrize("bad", [{}, {"a": (torch.zeros(2, 1, 32, 32), torch.zeros(3).long())}])
def test_bad_test_mapping_rejected_before_training(model, splits, bad):
    with pytest.raises(ValueError, match="test"):
        NaiveTrainer(model, TrainConfig(epochs=1)).fit(splits[0], splits[1], bad)


def test_optimizer_named_by_the_config():
    """SGD with weight decay takes exactly the step ``θ ← θ − η(∇ + λθ)``; Adam is the default."""
    layer = nn.Linear(3, 1, bias=False)
    start = layer.weight.detach().clone()
    sgd = make_optimizer(layer, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.5))
    assert isinstance(sgd, torch.optim.SGD)
    layer(torch.ones(1, 3)).sum().backward()
    sgd.step()
    expected = start - 0.1 * (torch.ones(1, 3) + 0.5 * start)
    torch.testing.assert_close(layer.weight.detach(), expected)
    assert isinstance(make_optimizer(layer, TrainConfig()), torch.optim.Adam)


def test_one_dimensional_signals_train_and_flip_along_their_axis():
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 1, 5).repeat(50, 1, 1)
    flipped = random_flip(x, torch.Generator().manual_seed(0))
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    kept = (flipped == x).flatten(1).all(1)
    assert bool((mirrored ^ kept).all()) and 30 < int(mirrored.sum()) < 70
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(6, 2))
    y = torch.arange(100) % 2
    result = NaiveTrainer(model, TrainConfig(epochs=1, flip=False)).fit((x, y), (x, y), (x, y))
    assert len(result.history) == 1


def test_every_training_loop_of_the_library_and_examples_is_the_shared_one():
    """Optimiser steps are taken in ``Trainer`` alone: no module of the library or the
    examples steps or zeroes an optimiser itself."""
    root = Path(__file__).resolve().parents[2]
    step = re.compile(r"\.step\(|\.zero_grad\(")
    stepping = {
        path.relative_to(root).as_posix()
        for folder in ("fastinfluence", "examples") for path in (root / folder).rglob("*.py")
        if step.search(path.read_text())
    }
    assert stepping == {"fastinfluence/robust/loop.py"}


class NextToken(Trainer):
    """A bigram language model's loss on token ids: the shared loop on integer samples."""

    def batch_loss(self, x, y, index):
        logits = self.model(x[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 5), x[:, 1:].reshape(-1))


def test_integer_samples_train_unflipped_and_refuse_flips():
    ids = torch.randint(0, 5, (9, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nn.Embedding(5, 5)
    before = model.weight.detach().clone()
    losses = NextToken(model, TrainConfig(epochs=3, lr=0.1, batch_size=4,
                                          flip=False)).fit_unlabelled(ids)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not torch.equal(model.weight, before) and not model.training
    with pytest.raises(ValueError, match="cannot be flipped"):
        NextToken(nn.Embedding(5, 5), TrainConfig(epochs=1, flip=True)).fit_unlabelled(ids)
