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
@pytest.mark.parametrize("k", [1, 6])
def test_cuda_head_ops(dtype, shape, bias, k):
    """The directions of (7, 33, 3) and k = 1 of (1000, 300, 10) fit the kernel's shared-memory
    staging (32 KiB); the others are read from global memory."""
    A, P, y, Vw, Vb = head_problem(*shape, dtype=dtype, bias=bias, k=k)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(0, 5, 3), (7, 33, 3), (1000, 300, 10)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 4])
def test_cuda_head_lissa(dtype, shape, bias, k):
    A, P, _, Gw, Gb = head_problem(*shape, dtype=dtype, bias=bias, k=k)
    cuda_args = on_cuda(A, P, Gw, Gb)
    for batch_size in (None, 16):
        assert_all_close(
            NATIVE.head_lissa(*cuda_args, 0.1, 10.0, 20, batch_size, 3)[: 1 + bias],
            NATIVE.head_lissa(A, P, Gw, Gb, 0.1, 10.0, 20, batch_size, 3)[: 1 + bias],
            twins.head_lissa(A, P, Gw, Gb, 0.1, 10.0, 20, batch_size, 3)[: 1 + bias],
            dtype,
        )


@pytest.mark.parametrize("bad_label", [-1, 3])
def test_cuda_scores_reject_labels_out_of_range(bad_label):
    A, P, y, Sw, Sb = head_problem(100, 4, 3, k=2)
    y[[3, 70]] = bad_label
    with pytest.raises(RuntimeError, match=r"labels in \[0, C=3\); 2 do not"):
        NATIVE.head_scores(*on_cuda(A, P, y, Sw, Sb))


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
    # (n, K, L, C_out): whole 16-wide tiles; ragged tiles and C_out not a multiple of 8.
    for n, K, L, C_out in ((5, 32, 64, 16), (3, 37, 50, 19)):
        x, g, v = (torch.randn(s, dtype=dtype) for s in ((n, K, L), (n, C_out, L), (C_out, K)))
        for op in ("conv2d_per_sample_grad", "conv2d_per_sample_grad_dot"):
            args = (x, g, v) if op.endswith("dot") else (x, g)
            assert_all_close(
                [getattr(NATIVE, op)(*on_cuda(*args))],
                [getattr(NATIVE, op)(*args)],
                [getattr(twins, op)(*args)],
                dtype,
            )


def test_cuda_opcheck():
    A, P, y, Vw, Vb = on_cuda(*head_problem(12, 5, 3, k=2))
    torch.library.opcheck(NATIVE.head_hvp, (A, P, Vw, Vb, 0.1))
    torch.library.opcheck(NATIVE.head_scores, (A, P, y, Vw, Vb))
    torch.library.opcheck(NATIVE.head_lissa, (A, P, Vw, Vb, 0.1, 3.0, 4, 5, 0))
