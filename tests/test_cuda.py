"""The engine on a CUDA device against the same engine on the CPU (skipped without a GPU).

Each case runs :class:`fastinfluence.Influence` twice on the same float64 model and data: once
on the CPU and once with model and data on ``cuda``. The scores must agree to float64 rounding
and the report must name the same path, curvature, solver and way of scoring, so a fast path
that silently falls back on the GPU fails here. The native CUDA kernels have their own tests
in ``tests/ops/test_cuda_ops.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from problems import make_problem, relative_error, with_running_statistics
from torch import nn

import fastinfluence as fi
from fastinfluence.models import PaperCNN, ResCNN1d, resnet18

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def images(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator))


def paper_cnn_problem():
    torch.manual_seed(0)
    train, val = images(24, (1, 32, 32), 1), images(6, (1, 32, 32), 2)
    model = with_running_statistics(PaperCNN(32, channels=(4, 4, 8, 8, 8)).double(), train[0])
    return model, train, val


def resnet_problem():
    torch.manual_seed(0)
    train, val = images(12, (3, 16, 16), 3), images(4, (3, 16, 16), 4)
    model = with_running_statistics(resnet18(3, width=4, stem="small").double(), train[0])
    return model, train, val


def rescnn_problem():
    torch.manual_seed(0)
    train, val = images(16, (1, 64), 5), images(4, (1, 64), 6)
    model = with_running_statistics(ResCNN1d(3, width=2, blocks=4).double(), train[0])
    return model, train, val


def kfac_layers(model: nn.Module) -> list[str]:
    """The Linear and Conv2d modules, the selection K-FAC covers."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))]


def small_cnn_problem():
    return make_problem("cnn", seed=7, n_train=20, n_val=6)


def mlp_problem():
    return make_problem("mlp", seed=8, n_train=30, n_val=8)


CASES: dict[str, tuple[Callable, dict]] = {
    "paper-cnn-last-direct": (paper_cnn_problem, {"params": "last", "solver": "direct"}),
    "paper-cnn-all-cg": (paper_cnn_problem,
                         {"params": "all", "solver": "cg", "tol": 1e-12, "max_iter": 400}),
    "paper-cnn-kfac": (paper_cnn_problem, {"params": kfac_layers, "hessian": "kfac"}),
    "paper-cnn-ekfac": (paper_cnn_problem, {"params": kfac_layers, "hessian": "ekfac"}),
    "resnet-all-cg": (resnet_problem, {"params": "all", "solver": "cg", "tol": 1e-12,
                                       "max_iter": 400}),
    "resnet-last": (resnet_problem, {"params": "last"}),
    "rescnn-all-direct": (rescnn_problem, {"params": "all", "solver": "direct"}),
    "resnet-all-woodbury": (resnet_problem, {"params": "all", "solver": "woodbury",
                                             "chunk_size": 5}),
    "paper-cnn-all-woodbury": (paper_cnn_problem, {"params": "all", "solver": "woodbury"}),
    "small-cnn-all-exact-direct": (small_cnn_problem,
                                   {"params": "all", "hessian": "exact", "solver": "direct",
                                    "damping": 5.0}),
    "mlp-all-lissa": (mlp_problem, {"params": "all", "solver": "lissa", "depth": 3000,
                                    "tol": 1e-12, "damping": 0.5}),
}

REPORTED = ("path", "solver", "hessian", "scoring", "num_params")


def built(case: str):
    """The case's model, data and options (a callable option is applied to the model)."""
    build, options = CASES[case]
    model, train, val = build()
    return model, train, val, {k: v(model) if callable(v) else v for k, v in options.items()}


def on(device: str, model: nn.Module, *data: tuple[torch.Tensor, torch.Tensor]):
    return (copy.deepcopy(model).to(device),
            *[(x.to(device), y.to(device)) for x, y in data])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.device.type == DEVICE, f"{what}: result on {actual.device}"
    error = relative_error(actual.cpu(), expected)
    assert error < 1e-8, f"{what}: relative difference {error:.2e} from the CPU run"


@pytest.mark.parametrize("case", list(CASES))
def test_scores_on_cuda_match_cpu(case):
    model, train, val, options = built(case)
    cpu = fi.Influence(*on("cpu", model, train, val), **options)
    gpu = fi.Influence(*on(DEVICE, model, train, val), **options)
    for field in REPORTED:
        assert getattr(gpu.report, field) == getattr(cpu.report, field), field
    assert_close(gpu.scores(), cpu.scores(), f"{case} scores")


@pytest.mark.parametrize("case", ["paper-cnn-last-direct", "resnet-all-cg"])
def test_self_influence_and_pairwise_on_cuda_match_cpu(case):
    model, train, val, options = built(case)
    cpu = fi.Influence(*on("cpu", model, train, val), **options)
    gpu = fi.Influence(*on(DEVICE, model, train, val), **options)
    assert_close(gpu.self_influence(), cpu.self_influence(), f"{case} self-influence")
    queries = (val[0][:3], val[1][:3])
    assert_close(gpu.pairwise(on(DEVICE, model, queries)[1]), cpu.pairwise(queries),
                 f"{case} pairwise")


def test_float32_head_on_cuda_matches_float64_cpu():
    """The user's case: a float32 model on the GPU; its head path reads features through the
    inference copy (BatchNorm folded), checked against float64 on the CPU."""
    model, train, val = paper_cnn_problem()
    expected = fi.Influence(*on("cpu", model, train, val), params="last").scores()
    model32 = copy.deepcopy(model).float().to(DEVICE)
    train32, val32 = ((x.float().to(DEVICE), y.to(DEVICE)) for x, y in (train, val))
    inf = fi.Influence(model32, train32, val32, params="last")
    assert inf.report.path == "head-closed-form"
    assert inf.report.feature_pass.startswith("fx copy"), inf.report.feature_pass
    error = relative_error(inf.scores().double().cpu(), expected)
    assert error < 1e-3, error
