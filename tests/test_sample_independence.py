"""A model whose eval-mode output for a sample depends on its batch is refused, naming the
module; ordinary models (float32 included) pass the check."""

from __future__ import annotations

import pytest
import torch
from problems import LSTMClassifier, make_problem, with_running_statistics
from torch import nn

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.functional import FunctionalModel
from fastinfluence.labelled_data import LabelledData
from fastinfluence.models import PaperCNN, ResCNN1d, resnet18
from fastinfluence.params import select_parameters
from fastinfluence.sample_independence import check_sample_independence


class CentredOverTheBatch(nn.Module):
    """Centres its features over the batch dimension in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        return self.head(torch.tanh(features - features.mean(dim=0)))


def data(shape: tuple[int, ...], n: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(n)
    return (torch.randn(n, *shape, generator=generator, dtype=dtype),
            torch.randint(0, 3, (n,), generator=generator))


def batch_statistics_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(3, 3, 3, padding=1),
                                       nn.BatchNorm2d(3, track_running_stats=False)),
                         nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def batch_statistics_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False),
                         nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize(("make", "shape", "batch_size", "message"), [
    (batch_statistics_mlp, (5,), None,
     r"module '1' \(BatchNorm1d\) fails on a sample alone \(ValueError: Expected more"),
    (batch_statistics_cnn, (1, 8, 8), None,
     r"module '2.1' \(BatchNorm2d\) gives a sample another output alone than in a batch"),
    (batch_statistics_cnn, (1, 8, 8), 1, r"module '2.1' \(BatchNorm2d\) gives"),
    (CentredOverTheBatch, (5,), None, r"the model's own forward \(CentredOverTheBatch\) gives"),
    (CentredOverTheBatch, (5,), 1, r"the model's own forward \(CentredOverTheBatch\) gives"),
], ids=["batchnorm1d", "batchnorm2d", "batchnorm2d-batch-of-1", "by-hand", "by-hand-batch-of-1"])
def test_a_model_that_mixes_the_samples_of_a_batch_is_refused_naming_the_module(
        make, shape, batch_size, message):
    """Its scores would change with ``batch_size`` (by 60–126 % on the BatchNorm1d model);
    with ``batch_size=1`` the probe holds one validation sample and the first two training
    samples are checked."""
    torch.manual_seed(0)
    model = make().double().eval()
    with pytest.raises(ValueError, match=message + r".*depends on the other samples"):
        fi.Influence(model, data(shape, 12), data(shape, 4), params="all",
                     batch_size=batch_size)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(m.training for m in model.modules())


def ordinary_models():
    """Models as users train them, in float32: BatchNorm with running statistics, Dropout,
    residual blocks, an LSTM, per-sample normalisations."""
    image = torch.randn(8, 3, 32, 32)
    yield "resnet18", with_running_statistics(resnet18(3, width=8), image), image[:3]
    spectra = torch.randn(8, 1, 64)
    yield "rescnn", with_running_statistics(ResCNN1d(width=4, blocks=2), spectra), spectra[:3]
    scans = torch.randn(8, 1, 32, 32)
    yield "paper-cnn", with_running_statistics(PaperCNN(32, channels=(4, 4, 4, 4, 4)),
                                               scans), scans[:3]
    yield "lstm", LSTMClassifier(), torch.randn(3, 6, 3)
    yield "per-sample norms", nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(),
        nn.LayerNorm(144), nn.Dropout(0.5), nn.Linear(144, 3)), torch.randn(3, 1, 8, 8)


@pytest.mark.parametrize(("name", "model", "example"), list(ordinary_models()),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_ordinary_float32_models_pass_the_check(name, model, example):
    model.eval()
    fmodel = FunctionalModel(model, select_parameters(model, "all"), None, torch.device("cpu"))
    check_sample_independence(fmodel, example, LabelledData(data((1,), 2), "train"))


def test_ordinary_models_score_as_before_and_come_back_unchanged():
    model, train, val = make_problem("cnn", n_train=6, n_val=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    influence = fi.Influence(model, train, val, params="all", hessian="gauss-newton",
                             solver="direct", damping=0.1, batch_size=1)
    plist = list(model.parameters())
    solution = reference.ihvp_direct(reference.gauss_newton(model, plist, *train),
                                     reference.mean_loss_grad(model, plist, *val), 0.1)
    expected = -reference.per_sample_grads(model, plist, *train) @ solution
    torch.testing.assert_close(influence.scores(), expected, rtol=1e-8, atol=1e-10)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
