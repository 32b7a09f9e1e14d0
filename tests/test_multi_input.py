"""Models of several inputs: data yielding ``((x1, x2), y)`` (positional arguments) or
``({"input_ids": ..., "attention_mask": ...}, y)`` (keyword arguments), in every data form and
on every path, against the float64 oracle of :mod:`fastinfluence.reference` run on a packed
twin of the model (one tensor, split into the inputs inside)."""

from __future__ import annotations

import copy
from collections import UserDict

import pytest
import torch
from problems import LSTMClassifier, Packed, small_cnn, with_running_statistics
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fastinfluence as fi
from fastinfluence import distributed, reference
from fastinfluence.labelled_data import LabelledData, first_samples, map_inputs

N_TRAIN, N_TEST = 14, 5


class TwoInputs(nn.Module):
    """``head(tanh(a(x1) + b(x2)))``, called as ``model(x1, x2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 6), nn.Linear(2, 6), nn.Linear(6, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x1) + self.b(x2)))


class Tokens(nn.Module):
    """A bag of embedded tokens under an attention mask, called as
    ``model(input_ids=..., attention_mask=...)`` (as Hugging Face models are)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[..., None].to(self.embedding.weight.dtype)
        pooled = (self.embedding(input_ids) * mask).sum(dim=1) / mask.sum(dim=1)
        return self.head(torch.tanh(pooled))


def two_inputs(n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    x2 = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (x1, x2), torch.cat([x1, x2], dim=1)


def tokens(n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (n, 5), generator=generator)
    mask = (torch.rand(n, 5, generator=generator) > 0.3).long()
    mask[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}, torch.cat([ids, mask], 1).double()


CASES = {
    "tuple": (TwoInputs, two_inputs, lambda X: ((X[:, :3], X[:, 3:]), {})),
    "dict": (Tokens, tokens, lambda X: ((), {"input_ids": X[:, :5].long(),
                                             "attention_mask": X[:, 5:].long()})),
}


class Samples(Dataset):
    """A map-style dataset of ``(x, y)`` with ``x`` a tuple or dict of one sample's tensors."""

    def __init__(self, inputs, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return map_inputs(lambda t: t[index], self.inputs), self.targets[index]


def problem(case: str):
    make, inputs_of, unpack = CASES[case]
    torch.manual_seed(0)
    model = make().double().eval()
    generator = torch.Generator().manual_seed(1)
    y_train = torch.randint(0, 3, (N_TRAIN,), generator=generator)
    y_test = torch.randint(0, 3, (N_TEST,), generator=generator)
    (train_x, train_packed), (test_x, test_packed) = inputs_of(N_TRAIN, 2), inputs_of(N_TEST, 3)
    return (model, Packed(model, unpack), (train_x, y_train), (test_x, y_test),
            (train_packed, y_train), (test_packed, y_test))


def forms(data):
    """The three data forms of the same samples."""
    dataset = Samples(*data)
    return {"tensors": data, "dataset": dataset, "loader": DataLoader(dataset, batch_size=4)}


@pytest.mark.parametrize("form", ["tensors", "dataset", "loader"])
@pytest.mark.parametrize("params", ["last", "all"])
@pytest.mark.parametrize("case", ["tuple", "dict"])
def test_several_inputs_score_as_the_oracle_in_every_form(case, params, form):
    model, packed, train, test, packed_train, packed_test = problem(case)
    plist = ([packed.model.head.weight, packed.model.head.bias] if params == "last"
             else list(packed.parameters()))
    damping = 1.0
    train_form, test_form = forms(train)[form], forms(test)[form]
    inf = fi.Influence(model, train_form, test_form, params=params, hessian="exact",
                       damping=damping, batch_size=4)
    if params == "last":
        assert inf.report.path == "head-closed-form"
    else:
        assert inf.report.scoring == "torch.func.jvp"
        assert "several inputs" in inf.report.scoring_reason
    expected = reference.influence_scores(packed, plist, packed_train, packed_test, damping)
    torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        inf.self_influence(test_form),
        reference.self_influence(packed, plist, packed_train, damping, data=packed_test),
        rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        inf.pairwise(test_form),
        reference.pairwise_influence(packed, plist, packed_train, packed_test, damping),
        rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", ["tuple", "dict"])
def test_gauss_newton_and_woodbury_rows_read_several_inputs(case):
    model, packed, train, test, packed_train, packed_test = problem(case)
    plist = list(packed.parameters())
    gauss_newton = reference.gauss_newton(packed, plist, *packed_train)
    s = reference.ihvp_direct(gauss_newton, reference.mean_loss_grad(packed, plist,
                                                                     *packed_test), 0.1)
    expected = -(reference.per_sample_grads(packed, plist, *packed_train) @ s)
    for solver in ("direct", "woodbury"):
        inf = fi.Influence(model, train, test, params="all", solver=solver, damping=0.1,
                           batch_size=4)
        assert inf.report.hessian == "gauss-newton"
        torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)


class SequenceAndScalar(nn.Module):
    """An LSTM over ``x1`` and a Linear on ``x2``: in float32 torch's CPU LSTM has no
    forward-mode derivative, so scores run in reverse mode."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence, self.side = LSTMClassifier(), nn.Linear(2, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.sequence(x1) + self.side(x2)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_reverse_mode_reads_several_inputs():
    torch.manual_seed(0)
    model = SequenceAndScalar().eval()
    x1, x2, y = torch.randn(10, 4, 3), torch.randn(10, 2), torch.randint(0, 3, (10,))
    inf = fi.Influence(model, ((x1, x2), y), ((x1[:4], x2[:4]), y[:4]), params="all",
                       damping=0.1, batch_size=4)
    assert inf.report.scoring == "reverse-mode"
    double = Packed(copy.deepcopy(model).double(),
                    lambda X: ((X[:, :12].reshape(-1, 4, 3), X[:, 12:]), {}))
    packed = torch.cat([x1.flatten(1), x2], dim=1).double()
    expected = -(reference.per_sample_grads(double, list(double.parameters()), packed, y)
                 @ inf.ihvp.double())
    torch.testing.assert_close(inf.scores().double(), expected, rtol=1e-4, atol=1e-6)


def test_every_tensor_of_an_input_is_checked():
    (x1, x2), _ = two_inputs(6, 0)
    y = torch.zeros(6, dtype=torch.long)
    bad = x2.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"train X\[1\] contains 1 NaN"):
        LabelledData(((x1, bad), y), "train")
    with pytest.raises(ValueError, match=r"train X\[0\]: 6, train X\[1\]: 5"):
        LabelledData(((x1, x2[:5]), y), "train")
    with pytest.raises(ValueError, match="differ in length"):
        LabelledData(((x1, x2), y[:5]), "train")
    ids = {"input_ids": torch.zeros(6, 5, dtype=torch.long), "scale": torch.full((6,), 1e400)}
    loader = DataLoader(Samples(ids, y), batch_size=4)
    with pytest.raises(ValueError, match=r"train x\['scale'\] contains 4 NaN or Inf"):
        next(LabelledData(loader, "train").batches(torch.device("cpu"), torch.float64))
    with pytest.raises(TypeError, match="tuple of tensors"):
        LabelledData(((x1, [1.0] * 6), y), "train")


def test_a_mapping_of_inputs_is_read_as_a_dict():
    """Hugging Face's tokenizers return a ``BatchEncoding``, a ``UserDict``."""
    model, _, train, test, _, _ = problem("dict")
    encoding = UserDict(train[0])
    (inputs, _), = LabelledData((encoding, train[1]), "train", batch_size=N_TRAIN).batches(
        torch.device("cpu"), torch.float64)
    assert type(inputs) is dict and inputs.keys() == encoding.keys()
    inf = fi.Influence(model, (encoding, train[1]), test, damping=1.0)
    torch.testing.assert_close(inf.scores(), fi.Influence(model, train, test,
                                                          damping=1.0).scores())


def test_shards_and_fingerprints_slice_every_input(tmp_path):
    model, _, train, test, _, _ = problem("dict")
    data = LabelledData(train, "train", batch_size=3)
    shard = distributed.Shards(None, rank=1, world=2).local(data)
    (inputs, targets), = list(shard.batches(torch.device("cpu"), torch.float64))[-1:]
    assert inputs["input_ids"].dtype == torch.int64  # token ids keep their dtype
    torch.testing.assert_close(inputs["attention_mask"], train[0]["attention_mask"][-1:])
    assert first_samples(train[0], 2)["input_ids"].shape == (2, 5)
    inf = fi.Influence(model, train, test, params="all", damping=1.0, out=tmp_path)
    written = inf.scores(out=tmp_path, chunk_size=5)
    torch.testing.assert_close(fi.read_output(tmp_path, "scores"), written)
    torch.testing.assert_close(written, inf.scores())


def test_perturbation_of_several_inputs_is_refused_with_a_hint():
    model, _, train, test, _, _ = problem("tuple")
    inf = fi.Influence(model, train, test, damping=1.0)
    with pytest.raises(TypeError, match="one input tensor"):
        inf.perturbation(test[0], test[1])


class ImageAndSide(nn.Module):
    """A small CNN on the image with BatchNorm (folded by the head's fx feature pass), its
    features concatenated with a side input before the Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_cnn()[:5]
        self.head = nn.Linear(3 * 4 * 4 + 2, 3)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.body(image), side], dim=1))


def test_the_heads_fx_feature_pass_reads_several_inputs():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(12, 1, 8, 8, generator=generator, dtype=torch.float64)
    side = torch.randn(12, 2, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=generator)
    model = ImageAndSide().double()
    with_running_statistics(model.body, images)
    model.eval()
    train, val = ((images, side), y), ((images[:4], side[:4]), y[:4])
    inf = fi.Influence(model, train, val, damping=0.1)
    assert inf.report.path == "head-closed-form"
    assert inf.report.feature_pass.startswith("fx copy: 1 Conv-BatchNorm pair folded")
    packed = Packed(model, lambda X: ((X[:, :64].reshape(-1, 1, 8, 8), X[:, 64:]), {}))
    flat = torch.cat([images.flatten(1), side], dim=1)
    expected = reference.influence_scores(packed, [model.head.weight, model.head.bias],
                                          (flat, y), (flat[:4], y[:4]), 0.1)
    torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)
