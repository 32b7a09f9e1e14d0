"""The fused tangent pass against its twin, ``torch.func.jvp``, in float64 on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from problems import make_problem
from torch import nn

import fastinfluence as fi
from fastinfluence import layers, reference
from fastinfluence.models import PaperCNN
from fastinfluence.tangent import TangentProgram


def randomise_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters of every normalisation (the
    defaults γ = 1, β = 0 hide folding errors and a missing γ in a tangent)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.randn(c, generator=generator))
                    module.bias.copy_(torch.randn(c, generator=generator))
    return model.eval()


class Functional(nn.Module):
    """A non-Sequential model written with functional calls, as users write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return self.head(torch.sigmoid(x).flatten(1))


class Sliced(Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.norm(self.conv(x))).flatten(1)[:, :16])


class SlicedBatch(Functional):
    """Indexing the batch: samples dropped (``x[:, ...]`` keeps them, :class:`Sliced`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.norm(self.conv(x))).flatten(1)[1:])


MODELS = {
    "paper-cnn": (lambda: PaperCNN(image_size=32, channels=(4, 4, 6, 6, 6)), (1, 32, 32)),
    "conv-chain": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(6, 4, 3, groups=2),
            nn.Tanh(),
            nn.Dropout(0.5),
            nn.BatchNorm2d(4, affine=False),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 5, bias=False),
        ),
        (2, 9, 9),
    ),
    "functional": (Functional, (2, 4, 4)),
    "sliced": (Sliced, (2, 4, 4)),
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(7, 6),
            nn.BatchNorm1d(6),
            nn.Sigmoid(),
            nn.Linear(6, 5),
            nn.ReLU(),
            nn.BatchNorm1d(5),
            nn.Identity(),
            nn.Linear(5, 3),
        ),
        (7,),
    ),
}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name, detached."""
    return {n: v.detach() for n, v in [*model.named_parameters(), *model.named_buffers()]}


def twin(model: nn.Module, names: list[str], x: torch.Tensor, directions: list[dict]):
    """``torch.func.jvp`` of the logits along each direction: ``[k, B, C]``."""
    primal = state(model)
    out = []
    for direction in directions:

        def logits(selected: dict) -> torch.Tensor:
            return torch.func.functional_call(model, {**primal, **selected}, (x,))

        chosen = {n: primal[n] for n in names}
        with fi.functional.differentiable_attention():  # torch's fused attention has no jvp
            out.append(torch.func.jvp(logits, (chosen,),
                                      ({n: direction[n] for n in names},))[1])
    return torch.stack(out)


def compare(model: nn.Module, shape: tuple, names: list[str], k: int, seed: int,
            tokens: int | None = None) -> TangentProgram:
    """The compiled program's outputs and tangents against the model and ``jvp`` in float64,
    on 5 random inputs of ``shape`` (indices below ``tokens`` when it is given)."""
    generator = torch.Generator().manual_seed(seed)
    model = randomise_norms(model.double(), generator)
    if tokens is None:
        x = torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    else:
        x = torch.randint(0, tokens, (5, *shape), generator=generator)
    program, reason = TangentProgram.compile(model, x, state(model), names)
    assert program is not None, reason
    params = dict(model.named_parameters())
    directions = [
        {n: torch.randn(params[n].shape, generator=generator, dtype=torch.float64)
         for n in names}
        for _ in range(k)
    ]
    tensors = state(model)
    tangents = {n: torch.stack([d[n] for d in directions]) for n in names}
    logits, dlogits = program.forward(tensors, tangents, x, k)
    expected_logits = model(x)
    torch.testing.assert_close(logits, expected_logits.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dlogits, twin(model, names, x, directions), rtol=1e-9,
                               atol=1e-9)
    return program


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_pass_matches_jvp_all_parameters(kind, k, seed):
    build, shape = MODELS[kind]
    model = build()
    compare(model, shape, [n for n, _ in model.named_parameters()], k, seed)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("which", ["norms", "first", "weights"])
def test_fused_pass_matches_jvp_on_parameter_subsets(kind, which):
    build, shape = MODELS[kind]
    model = build()
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    if which == "norms":
        names = [n for n in names
                 if isinstance(modules[n.rsplit(".", 1)[0]], (nn.BatchNorm1d, nn.BatchNorm2d))]
    elif which == "first":
        names = names[:1]
    else:
        names = [n for n in names if n.endswith("weight")]
    if not names:
        pytest.skip("no such parameters in this model")
    compare(model, shape, names, 2, seed=3)


def test_contiguous_layout_matches_channels_last():
    """The CPU program keeps activations channels-last; the other layout gives the same."""
    build, shape = MODELS["paper-cnn"]
    model = randomise_norms(build().double(), torch.Generator().manual_seed(0))
    x = torch.randn(4, *shape, dtype=torch.float64)
    tensors = state(model)
    names = [n for n, _ in model.named_parameters()]
    cpu, _ = TangentProgram.compile(model, x, tensors, names)
    other, _ = TangentProgram.compile(model, x, tensors, names)
    assert cpu.channels_last
    other.channels_last = False  # the layout compile chooses off CPU
    tangents = {n: torch.randn(2, *tensors[n].shape, dtype=torch.float64) for n in names}
    a = cpu.forward(tensors, tangents, x, 2)
    b = other.forward(tensors, tangents, x, 2)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_relu_pool_swap_keeps_tangents_on_exact_ties():
    """Zero background makes exact ties in pooling windows, here at exactly 0 before the ReLU
    (its kink, where torch's derivative is 0); pooling before the ReLU must give the tangents
    of ReLU-then-pool."""
    generator = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model = randomise_norms(model.double(), generator)
    with torch.no_grad():  # background pre-activations exactly 0
        model[0].bias.zero_()
        model[1].running_mean.zero_()
        model[1].bias.zero_()
    x = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    x[:, :, 2:5, 3:6] = torch.rand(3, 1, 3, 3, generator=generator, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    program, reason = TangentProgram.compile(model, x, state(model), names)
    assert program is not None, reason
    assert [step.kind for step in program.steps][:3] == ["affine", "maxpool", "relu"]
    params = dict(model.named_parameters())
    direction = {n: torch.randn(params[n].shape, generator=generator, dtype=torch.float64)
                 for n in names}
    tensors = state(model)
    tangents = {n: direction[n][None] for n in names}
    _, dlogits = program.forward(tensors, tangents, x, 1)
    torch.testing.assert_close(dlogits, twin(model, names, x, [direction]), rtol=1e-9,
                               atol=1e-9)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.one = nn.Linear(4, 1)
        self.three = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.one(x), self.three(x)


class Broadcast(TwoHeads):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.one(x) + self.three(x)


class InPlace(TwoHeads):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.three(x)
        return self.relu(y) + y


class TwoInputs(TwoHeads):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.three(x + y)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


@pytest.mark.parametrize(
    ("model", "shape", "reason"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 3)), (4,), "SiLU"),
        (TwoHeads(), (4,), "does not return one computed tensor"),
        (Broadcast(), (4,), "(broadcasting) is not supported"),
        (TwoInputs(), (4,), "takes 2 inputs"),
        (InPlace(), (4,), "an in-place relu of a value that others read too"),
        (DataDependent(), (4,), "torch.fx could not trace"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)), (4,),
         "running statistics"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
         (1, 5, 5), "padding_mode"),
        (nn.Sequential(nn.Flatten(0)), (4,), "batch dimension"),
        (nn.Sequential(nn.Linear(4, 4), nn.Flatten(-2)), (4,), "batch dimension"),
        (SlicedBatch(), (2, 4, 4), "keeps the batch whole"),
    ],
)
def test_unsupported_models_say_why(model, shape, reason):
    model = model.double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    tensors = state(model)
    program, why = TangentProgram.compile(model, x, tensors, list(dict(model.named_parameters())))
    assert program is None
    assert reason in why


def test_influence_reports_the_scoring_pass_and_both_passes_agree():
    """``Influence`` takes the fused pass on a chain CNN and says so; on a model it cannot
    compile it uses ``jvp`` and says why. Both give the per-sample-gradient scores."""
    model, train, val = make_problem("cnn")
    fused = fi.Influence(model, train, val, params="all", hessian="gauss-newton")
    assert fused.report.scoring == "fused-tangent" and fused.report.scoring_reason is None
    plist = list(model.parameters())
    expected = -(reference.per_sample_grads(model, plist, *train) @ fused.ihvp)
    torch.testing.assert_close(fused.scores(), expected, rtol=1e-9, atol=1e-11)

    silu = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.SiLU(), nn.Linear(6, 3)).double()
    slow = fi.Influence(silu, train, val, params="all", hessian="gauss-newton")
    assert slow.report.scoring == "torch.func.jvp" and "SiLU" in slow.report.scoring_reason
    expected = -(reference.per_sample_grads(silu, list(silu.parameters()), *train) @ slow.ihvp)
    torch.testing.assert_close(slow.scores(), expected, rtol=1e-9, atol=1e-11)

    test = (train[0][:4], train[1][:4])
    pairwise = fused.pairwise(test)
    grads = reference.per_sample_grads(model, plist, *train)
    test_grads = reference.per_sample_grads(model, plist, *test)
    matrix = reference.gauss_newton(model, plist, *train)
    matrix += fused.damping * torch.eye(len(matrix), dtype=matrix.dtype)
    solved = torch.linalg.solve(matrix, test_grads.T)
    torch.testing.assert_close(pairwise, -(grads @ solved), rtol=1e-6, atol=1e-9)


class Tied(nn.Module):
    """An encoder and decoder sharing one square weight (``dec.weight is enc.weight``)."""

    def __init__(self, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Linear(features, features)
        self.dec = nn.Linear(features, features)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.dec(torch.tanh(self.enc(x)))))


@pytest.mark.parametrize("names", [["enc.weight", "enc.bias", "dec.bias", "head.weight",
                                    "head.bias"], ["enc.weight"], ["dec.bias", "head.weight"]])
def test_tied_weights_are_read_and_differentiated_under_one_name(names):
    """``dec.weight`` is read as ``enc.weight``; selected, its tangent enters at both uses."""
    model = Tied()
    assert "dec.weight" not in state(model)
    program = compare(model, (5,), names, 2, seed=6)
    assert [step.keys["weight"] for step in program.steps if step.kind == "affine"] == [
        "enc.weight", "enc.weight", "head.weight"]


def test_influence_scores_a_model_with_tied_weights():
    _, train, val = make_problem("mlp")
    torch.manual_seed(0)
    model = Tied().double().eval()
    influence = fi.Influence(model, train, val, params="all", hessian="gauss-newton")
    assert influence.report.scoring == "fused-tangent", influence.report.scoring_reason
    grads = reference.per_sample_grads(model, list(model.parameters()), *train)
    torch.testing.assert_close(influence.scores(), -(grads @ influence.ihvp), rtol=1e-9,
                               atol=1e-11)


def test_batchnorm_after_a_linear_on_3d_input_runs_on_its_own_axis():
    """``Linear`` on ``[B, L, F]`` has its channels last; ``BatchNorm1d(L)`` normalises dim 1,
    so it must not be folded into the Linear (here ``L`` = out features, so a wrong fold
    would even fit the shapes)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 3))
    program = compare(model, (4, 3), [n for n, _ in model.named_parameters()], 2, seed=7)
    assert [step.kind for step in program.steps] == ["affine", "norm", "relu", "flatten",
                                                     "affine"]
    assert program.steps[0].norm is None
    folded = compare(MODELS["mlp"][0](), (7,), ["0.weight", "1.weight"], 1, seed=7)
    assert folded.steps[0].norm is not None  # on 2-d input the same pair is folded


def tanh_model() -> tuple[nn.Module, torch.Tensor, dict, list[str]]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    return model, x, state(model), [n for n, _ in model.named_parameters()]


def test_a_wrong_rule_is_caught_by_the_numerical_check(monkeypatch):
    model, x, tensors, names = tanh_model()
    rule = layers.layer_rules(nn.Tanh).tangent
    run = rule.run

    def off_by_a_little(step, at, x, dx):
        y, dy = run(step, at, x, dx)
        return y, dy + 1e-3

    monkeypatch.setattr(rule, "run", off_by_a_little)
    program, reason = TangentProgram.compile(model, x, tensors, names)
    assert program is None
    assert reason.startswith("numerical check against torch.func.jvp failed: max relative")


def test_an_exception_in_a_rule_falls_back_with_the_reason(monkeypatch):
    model, x, tensors, names = tanh_model()

    def broken(step, at, x, dx):
        raise RuntimeError("no kernel for this input")

    monkeypatch.setattr(layers.layer_rules(nn.Tanh).tangent, "run", broken)
    program, reason = TangentProgram.compile(model, x, tensors, names)
    assert program is None  # the reason carries the rule's exception
    assert "RuntimeError: no kernel for this input" in reason


def test_tensors_that_cannot_be_resolved_fall_back_at_compile_time():
    model, x, tensors, names = tanh_model()
    missing = {n: v for n, v in tensors.items() if n != "2.bias"}
    program, reason = TangentProgram.compile(model, x, missing, names[:2])
    assert program is None and "'2.bias'" in reason  # the reason names the tensor
    program, reason = TangentProgram.compile(model, x, missing, names)
    assert program is None and "'2.bias'" in reason

    del model[2].weight  # a plain tensor attribute: no parameter or buffer holds it
    model[2].weight = torch.randn(3, 5, dtype=torch.float64)
    tensors, names = state(model), [n for n, _ in model.named_parameters()]
    program, reason = TangentProgram.compile(model, x, tensors, names)
    assert program is None and "2.weight" in reason


def test_compile_rejects_an_empty_example():
    model, x, tensors, names = tanh_model()
    with pytest.raises(ValueError, match="example must be a batch"):
        TangentProgram.compile(model, x[:0], tensors, names)


class ResidualCNN(nn.Module):
    """A stem, an identity-shortcut block and a strided block with a 1×1 shortcut (as in a
    ResNet), then max- plus average-pooling, flatten and a head; one ReLU module is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(6)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(6))
        self.pool = nn.MaxPool2d(2)
        self.average = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.stem_norm(self.stem(x)))
        out = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(h)))))
        out += h
        h = self.relu(out)
        h = torch.relu(torch.add(self.norm3(self.conv3(h)), self.shortcut(h)))
        return self.head(torch.flatten(self.pool(h) + self.average(h), 1))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("which", ["all", "norms"])
def test_residual_network_matches_jvp(k, which):
    """The program as a graph: shortcuts read a value twice, adds sum the tangents; every
    BatchNorm is still folded (its convolution has no other reader)."""
    model = ResidualCNN()
    names = [n for n, _ in model.named_parameters() if which == "all" or "norm" in n
             or n.startswith("shortcut.1")]
    program = compare(model, (2, 8, 8), names, k, seed=9)
    kinds = [step.kind for step in program.steps]
    assert kinds.count("add") == 3 and "avgpool" in kinds and "norm" not in kinds
    assert all(step.norm is not None for step in program.steps[:-1] if step.kind == "affine")


class ResidualCNN1d(nn.Module):
    """The MRS paper's shape of model: 1-d convolutions with BatchNorm and Dropout in residual
    blocks (identity and strided 1×1 shortcuts), global average pooling and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 5, padding=2)
        self.block = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5),
                                   nn.Conv1d(4, 4, 5, padding=2, bias=False), nn.BatchNorm1d(4),
                                   nn.ReLU(), nn.Conv1d(4, 4, 5, padding=2))
        self.down = nn.Sequential(nn.Conv1d(4, 6, 5, stride=2, padding=2, bias=False),
                                  nn.BatchNorm1d(6), nn.ReLU())
        self.shortcut = nn.Conv1d(4, 6, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        h = self.down(h) + self.shortcut(h)
        return self.head(self.pool(h).flatten(1))


@pytest.mark.parametrize("k", [1, 3])
def test_one_dimensional_residual_network_matches_jvp(k):
    model = ResidualCNN1d()
    program = compare(model, (1, 24), [n for n, _ in model.named_parameters()], k, seed=11)
    kinds = [step.kind for step in program.steps]
    assert kinds.count("add") == 2 and "avgpool" in kinds


class SharedValues(nn.Module):
    """A convolution read by a BatchNorm and a ReLU, the ReLU by an add and a pool: neither
    the fold nor the pool-first swap may apply (each would change another reader's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.pool = nn.MaxPool2d(2)
        self.average = nn.AvgPool2d(2)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = torch.relu(y)
        return self.head((self.pool(a) + self.average(self.norm(y) + a)).flatten(1))


def test_values_with_several_readers_are_neither_folded_nor_swapped():
    model = SharedValues()
    program = compare(model, (1, 6, 6), [n for n, _ in model.named_parameters()], 2, seed=10)
    assert [step.kind for step in program.steps] == [
        "affine", "relu", "maxpool", "norm", "add", "avgpool", "add", "flatten", "affine"]


def test_a_new_layer_is_one_registration():
    """The registry's documented example (``register_layer``'s docstring), verbatim, inside
    ``temporary_registrations``: the rule runs in the block and is gone after it."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.3), nn.Linear(6, 3))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 4, dtype=torch.float64)
    program, reason = TangentProgram.compile(model.double(), x, state(model), names)
    assert program is None and "1 (LeakyReLU) is not supported" in reason
    Rule, per_direction, register_layer = layers.Rule, layers.per_direction, fi.register_layer
    relu_rule = fi.layer_rules(nn.ReLU)

    with layers.temporary_registrations():

        @register_layer(nn.LeakyReLU)
        class LeakyReLURule(Rule):
            kind = "leaky_relu"

            def configure(self, site):
                return {"slope": site.module.negative_slope}

            def run(self, step, at, x, dx):
                slope = step.options["slope"]
                y = F.leaky_relu(x, slope)
                if dx is None:
                    return y, None
                factor = torch.full_like(x, slope).masked_fill_(x > 0, 1.0)
                return y, per_direction(dx, x, at.k, factor)

        register_layer(nn.ReLU)(LeakyReLURule)  # replaces an aspect: restored on exit
        program = compare(model, (4,), names, 2, seed=11)
        assert [step.kind for step in program.steps] == ["affine", "leaky_relu", "affine"]

    assert fi.layer_rules(nn.LeakyReLU) is None and fi.layer_rules(nn.ReLU) == relu_rule
    program, reason = TangentProgram.compile(model, x, state(model), names)
    assert program is None and "1 (LeakyReLU) is not supported" in reason


def near_tie_model(windows: int = 256) -> tuple[nn.Module, torch.Tensor]:
    """A float32 model whose max-pool windows hold two values equal up to float32 rounding
    (``w_a·u`` and ``w_b·v`` with ``v = fl32(w_a·u / w_b)``) but with different tangents: which
    one a window picks in float32 depends on how the sums are rounded."""
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 1, 1), nn.BatchNorm2d(1), nn.ReLU(),
                          nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(windows, 3))
    w_a, w_b = 0.7, -1.3
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([w_a, w_b]).view(1, 2, 1, 1))
        model[0].bias.fill_(0.1)
        model[1].running_mean.fill_(-0.2)
        model[1].running_var.fill_(0.37)
        model[1].weight.fill_(1.7)
        model[1].bias.fill_(0.3)
    u = torch.rand(2, windows, generator=generator, dtype=torch.float64) + 0.5
    x = torch.zeros(2, 2, 1, 2 * windows)
    x[:, 0, 0, 0::2] = u.float()
    x[:, 1, 0, 1::2] = (w_a * u / w_b).float()
    return model.eval(), x


def test_the_check_compares_in_float64_so_float32_rounding_at_max_pool_ties_passes():
    model, x = near_tie_model()
    names = [n for n, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64)
                 for n, p in model.named_parameters()}
    float32 = twin(model, names, x, [{n: d.float() for n, d in direction.items()}])
    x64 = x.double()
    float64 = twin(model.double(), names, x64, [direction])
    tensors64 = state(model)
    # the premise: in float32 even jvp is off by O(1) at the near-ties, so comparing the pass
    # with jvp in float32 (the check before) measures rounding, and rejected this model
    assert (float32.double() - float64).abs().max() > 1e-3 * float64.abs().max()
    model.float()
    program, reason = TangentProgram.compile(model, x, state(model), names)
    assert program is not None, reason
    tangents = {n: d[None] for n, d in direction.items()}
    _, dlogits = program.forward(tensors64, tangents, program.layout(x64), 1)
    torch.testing.assert_close(dlogits, float64, rtol=1e-10, atol=1e-10)


def test_the_check_catches_a_rule_error_below_float32_rounding_in_a_float32_model(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))
    rule = layers.layer_rules(nn.Tanh).tangent
    run = rule.run

    def off_by_a_millionth(step, at, x, dx):
        y, dy = run(step, at, x, dx)
        return y, dy * (1 + 1e-6)

    monkeypatch.setattr(rule, "run", off_by_a_millionth)
    program, reason = TangentProgram.compile(model, x, state(model), names)
    assert program is None
    assert reason.startswith("numerical check against torch.func.jvp failed: max relative")
    assert "in torch.float64" in reason


def test_a_rule_that_fails_only_in_the_callers_precision_falls_back(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))
    rule = layers.layer_rules(nn.Tanh).tangent
    run = rule.run

    def float64_only(step, at, x, dx):
        if x.dtype != torch.float64:
            raise TypeError(f"no {x.dtype} kernel")
        return run(step, at, x, dx)

    monkeypatch.setattr(rule, "run", float64_only)
    program, reason = TangentProgram.compile(model, x, state(model), names)
    assert program is None
    assert reason == ("numerical check against torch.func.jvp raised TypeError: no "
                      "torch.float32 kernel")
def test_constant_pads_match_jvp_in_one_and_two_dimensions():
    """The pad rule: primal padded with the module's value, tangent with zeros."""
    model = nn.Sequential(nn.ConstantPad1d((1, 2), 0.5), nn.Conv1d(2, 3, 4, bias=False),
                          nn.BatchNorm1d(3), nn.ReLU(), nn.ZeroPad1d(1), nn.Conv1d(3, 2, 3),
                          nn.Flatten(), nn.Linear(2 * 8, 3))
    program = compare(model, (2, 8), [n for n, _ in model.named_parameters()], 2, seed=12)
    assert [step.kind for step in program.steps].count("pad") == 2
    image = nn.Sequential(nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(1, 2, 3), nn.ConstantPad2d(1, -1.0),
                          nn.Flatten(), nn.Linear(2 * 9 * 7, 2))
    compare(image, (1, 6, 6), [n for n, _ in image.named_parameters()], 1, seed=13)


@pytest.mark.parametrize("which", ["all", "last-block"])
def test_mrs_rescnn_matches_jvp(which):
    """The MRS paper's ResCNN (narrow and short here): width-32 kernels behind explicit pads,
    residual adds with identity and strided 1×1 shortcuts, dropout, GAP."""
    from fastinfluence.models import ResCNN1d

    model = ResCNN1d(width=2, blocks=3)
    names = [n for n, _ in model.named_parameters()
             if which == "all" or n.startswith(("blocks.2.bn2", "fc"))]
    program = compare(model, (1, 40), names, 2, seed=14)
    kinds = [step.kind for step in program.steps]
    assert kinds.count("add") == 3 and kinds.count("pad") == 7 and "avgpool" in kinds


class GELUFunctional(nn.Module):
    """``F.gelu`` in both of its forms, in a residual branch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + F.gelu(self.inner(x), approximate="tanh")
        return self.head(F.gelu(h))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("k", [1, 3])
def test_gelu_matches_jvp(approximate, k):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.GELU(approximate),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.GELU(approximate),
                          nn.Linear(5, 3))
    program = compare(model, (2, 6, 6), [n for n, _ in model.named_parameters()], k, seed=15)
    assert [step.kind for step in program.steps].count("gelu") == 2
    functional = GELUFunctional()
    program = compare(functional, (6,), [n for n, _ in functional.named_parameters()], k,
                      seed=16)
    assert [step.kind for step in program.steps] == ["affine", "gelu", "add", "gelu", "affine"]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_layer_norm_matches_jvp(affine, k):
    """Over the last axis of a sequence, and over the last two axes."""
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, elementwise_affine=affine),
                          nn.Tanh(), nn.LayerNorm((4, 6), elementwise_affine=affine),
                          nn.Flatten(), nn.Linear(24, 3))
    names = [n for n, _ in model.named_parameters()]
    program = compare(model, (4, 5), names, k, seed=17)
    assert [step.kind for step in program.steps].count("layernorm") == 2
    compare(model, (4, 5), [n for n in names if n.startswith(("1.", "3."))] or names[:2], k,
            seed=18)


@pytest.mark.parametrize("k", [1, 3])
def test_group_norm_matches_jvp(k):
    """On 2-d images (a group of several channels, channels-last on CPU) and 1-d signals
    (one channel per group, no affine parameters)."""
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 3))
    names = [n for n, _ in model.named_parameters()]
    program = compare(model, (2, 6, 6), names, k, seed=19)
    assert "groupnorm" in [step.kind for step in program.steps]
    compare(model, (2, 6, 6), ["1.weight", "1.bias"], k, seed=20)
    signal = nn.Sequential(nn.Conv1d(1, 4, 3), nn.GroupNorm(4, 4, affine=False), nn.Flatten(),
                           nn.Linear(4 * 6, 2))
    compare(signal, (1, 8), [n for n, _ in signal.named_parameters()], k, seed=21)


class TinyEncoder(nn.Module):
    """Token embeddings, a pre-norm feed-forward block with a residual add, a final LayerNorm
    and a dense head over the flattened positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6)
        self.final = nn.LayerNorm(6)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(torch.flatten(self.final(h), 1))


@pytest.mark.parametrize("which", ["all", "embedding"])
@pytest.mark.parametrize("k", [1, 3])
def test_embedding_matches_jvp(which, k):
    model = TinyEncoder()
    names = [n for n, _ in model.named_parameters() if which == "all" or n.startswith("embed")]
    program = compare(model, (4,), names, k, seed=22, tokens=11)
    assert [step.kind for step in program.steps] == [
        "embedding", "layernorm", "affine", "gelu", "affine", "add", "layernorm", "flatten",
        "affine"]


def test_influence_scores_through_the_added_layers_by_the_fused_pass():
    """The new layers end to end: ``Influence`` takes the fused pass on a GroupNorm / GELU /
    LayerNorm network and its scores are the per-sample-gradient ones."""
    _, train, val = make_problem("cnn", n_train=16, n_val=4)
    model = randomise_norms(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 6), nn.LayerNorm(6), nn.GELU("tanh"), nn.Linear(6, 3),
    ).double(), torch.Generator().manual_seed(24))
    influence = fi.Influence(model, train, val, params="all", hessian="gauss-newton")
    assert influence.report.scoring == "fused-tangent", influence.report.scoring_reason
    plist = list(model.parameters())
    expected = -(reference.per_sample_grads(model, plist, *train) @ influence.ihvp)
    torch.testing.assert_close(influence.scores(), expected, rtol=1e-9, atol=1e-11)


def test_an_embedding_with_a_padding_index_is_left_to_jvp():
    """Autograd gives the padding row no gradient; forward mode (``jvp`` too) moves it."""
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Flatten(),
                          nn.Linear(6, 2)).double()
    tokens = torch.tensor([[0, 1], [2, 3]])
    program, reason = TangentProgram.compile(model, tokens, state(model),
                                             [n for n, _ in model.named_parameters()])
    assert program is None and "padding_idx" in reason


class SelfAttention(nn.Module):
    """Single-head self-attention by ``F.scaled_dot_product_attention`` on ``[B, L, E]``, in a
    residual branch, then a transpose, a flatten and a head."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.scale = scale
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x),
                                                  scale=self.scale)
        return self.head(torch.flatten((x + attended).transpose(1, 2), 1))


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("k", [1, 3])
def test_scaled_dot_product_attention_matches_jvp(scale, k):
    model = SelfAttention(scale)
    program = compare(model, (5, 4), [n for n, _ in model.named_parameters()], k, seed=31)
    assert [step.kind for step in program.steps] == [
        "affine", "affine", "affine", "attention", "add", "transpose", "flatten", "affine"]


def tiny_vit() -> nn.Module:
    return fi.models.vit_tiny(3, image_size=8, patch=4, dim=8, depth=2, heads=2)


@pytest.mark.parametrize("which", ["all", "attention", "tokens"])
@pytest.mark.parametrize("k", [1, 3])
def test_vision_transformer_matches_jvp(which, k):
    """A ViT: strided patch embedding, class token and positions, pre-norm blocks of
    ``nn.MultiheadAttention`` and a GELU MLP, the class token's head."""
    model = tiny_vit()
    prefix = {"all": "", "attention": "blocks.1.attention", "tokens": "tokens"}[which]
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    program = compare(model, (1, 8, 8), names, k, seed=32)
    kinds = [step.kind for step in program.steps]
    assert kinds[:4] == ["affine", "flatten", "transpose", "class_token"]
    assert kinds.count("multihead_attention") == 2 and kinds[-2:] == ["getitem", "affine"]


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` with query, key and value three different values."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(4, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, self.key(x), torch.tanh(x), need_weights=False)[0]


@pytest.mark.parametrize("which", ["all", "in_proj_weight"])
@pytest.mark.parametrize("k", [1, 3])
def test_cross_attention_matches_jvp(which, k):
    model = CrossAttention()
    names = [n for n, _ in model.named_parameters() if which == "all" or n.endswith(which)]
    program = compare(model, (3, 4), names, k, seed=33)
    assert [step.kind for step in program.steps] == [
        "affine", "tanh", "multihead_attention", "getitem"]


class MaskedAttention(nn.Module):
    def __init__(self, batch_first: bool = True, **call) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, **self.call)[0]


class Weights(MaskedAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x)[1]


class Causal(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x, is_causal=True)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (MaskedAttention(batch_first=False, need_weights=False), "batch_first=False"),
        (Weights(), "attention weights"),
        (Causal(), "causal"),
    ],
)
def test_unsupported_attention_says_why(model, reason):
    model = model.double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    program, why = TangentProgram.compile(model, x, state(model),
                                          list(dict(model.named_parameters())))
    assert program is None and reason in why
