"""CUDA kernels against the CPU kernels and the twins (skipped without a GPU): `pytest -k cuda`."""

import pytest
import torch
from conftest import TOLERANCE, head_problem, requires_cuda

from fastinfluence.ops import twins

pytestmark = requires_cuda
NATIVE = torch.ops.fastinfluence


def on_cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def assert_all_close(cuda_result, cpu_result, twin_result, dtype):
    atol, rtol = TOLERANCE[dtype]
    for got, cpu, twin in zip(cuda_result, cpu_result, twin_result, strict=True):
        torch.testing.assert_close(got.cpu(), cpu, atol=atol, rtol=rtol)
        if twin is not None:
            torch.testing.assert_close(got.cpu(), twin, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(0, 5, 3), (7, 33, 3), (1000, 300, 10), (300, 3000, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_head_ops(dtype, shape, bias):
    A, P, y, Vw, Vb = head_problem(*shape, dtype=dtype, bias=bias)
    cuda_args = on_cuda(A, P, Vw, Vb)
    assert_all_close(
        NATIVE.head_hvp(*cuda_args, 0.1)[: 1 + bias],
        NATIVE.head_hvp(A, P, Vw, Vb, 0.1)[: 1 + bias],
        twins.head_hvp(A, P, Vw, Vb, 0.1)[: 1 + bias],
        dtype,
    )
    A_c, P_c, Vw_c, Vb_c = cuda_args
    assert_all_close(
        [NATIVE.head_scores(A_c, P_c, y.cuda(), Vw_c, Vb_c)],
        [NATIVE.head_scores(A, P, y, Vw, Vb)],
        [twins.head_scores(A, P, y, Vw, Vb)],
        dtype,
    )
    for batch_size in (None, 16):
        assert_all_close(
            NATIVE.head_lissa(*cuda_args, 0.1, 10.0, 20, batch_size, 3)[: 1 + bias],
            NATIVE.head_lissa(A, P, Vw, Vb, 0.1, 10.0, 20, batch_size, 3)[: 1 + bias],
            twins.head_lissa(A, P, Vw, Vb, 0.1, 10.0, 20, batch_size, 3)[: 1 + bias],
            dtype,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_lissa_update(dtype):
    v, g, hv = (torch.randn(10007, dtype=dtype) for _ in range(3))
    v_cuda = v.cuda()
    NATIVE.lissa_update_(v_cuda, g.cuda(), hv.cuda(), 0.1, 3.0)
    NATIVE.lissa_update_(v, g, hv, 0.1, 3.0)
    torch.testing.assert_close(v_cuda.cpu(), v, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_per_sample_grad_ops(dtype):
    x, g, v = (torch.randn(s, dtype=dtype) for s in ((9, 4, 3, 20), (9, 4, 3, 7), (7, 20)))
    for op in ("linear_per_sample_grad", "linear_per_sample_grad_dot"):
        args = (x, g, v) if op.endswith("dot") else (x, g)
        assert_all_close(
            [getattr(NATIVE, op)(*on_cuda(*args))],
            [getattr(NATIVE, op)(*args)],
            [getattr(twins, op)(*args)],
            dtype,
        )
    x, g, v = (torch.randn(s, dtype=dtype) for s in ((5, 27, 64), (5, 8, 64), (8, 27)))
    for op in ("conv2d_per_sample_grad", "conv2d_per_sample_grad_dot"):
        args = (x, g, v) if op.endswith("dot") else (x, g)
        assert_all_close(
            [getattr(NATIVE, op)(*on_cuda(*args))],
            [getattr(NATIVE, op)(*args)],
            [getattr(twins, op)(*args)],
            dtype,
        )


def test_cuda_opcheck():
    A, P, y, Vw, Vb = on_cuda(*head_problem(12, 5, 3))
    torch.library.opcheck(NATIVE.head_hvp, (A, P, Vw, Vb, 0.1))
    torch.library.opcheck(NATIVE.head_scores, (A, P, y, Vw, Vb))
    torch.library.opcheck(NATIVE.head_lissa, (A, P, Vw, Vb, 0.1, 3.0, 4, 5, 0))
