"""Fixtures of the engine's tests."""

import pytest
import torch
from problems import make_problem

# The test problems are tiny: with more threads, thread hand-offs cost more than the math
# (several times slower on a shared 2-core machine). Benchmarks set their own thread count.
torch.set_num_threads(1)


@pytest.fixture(params=["logistic", "mlp", "cnn"])
def problem(request):
    return request.param, *make_problem(request.param)
