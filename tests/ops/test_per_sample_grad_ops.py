"""Per-sample gradients of Linear / Conv2d and their dot products with a direction."""

import pytest
import torch
from conftest import TOLERANCE, noncontiguous, requires_native

from fastinfluence import ops
from fastinfluence.ops import twins

NATIVE = torch.ops.fastinfluence
LINEAR_SHAPES = [((0, 4), 3), ((5, 7), 3), ((4, 3, 6), 2), ((3, 2, 5, 9), 4), ((6, 1, 33), 17)]
CONV_SHAPES = [(0, 4, 5, 3), (3, 12, 25, 4), (2, 27, 64, 8), (5, 1, 1, 1)]


def random(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def test_twins_equal_autograd_per_sample_gradients():
    linear = torch.nn.Linear(6, 4, bias=False).double()
    conv = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1, bias=False).double()
    x_seq, x_img = random((5, 3, 6)), random((5, 2, 6, 6), seed=1)
    for i in range(5):
        out = linear(x_seq[i : i + 1])
        (grad_w,) = torch.autograd.grad((out**2).sum(), linear.weight)
        G = twins.linear_per_sample_grad(x_seq[i : i + 1], 2 * out.detach())
        torch.testing.assert_close(G[0], grad_w)
        out = conv(x_img[i : i + 1])
        (grad_w,) = torch.autograd.grad((out**2).sum(), conv.weight)
        unfolded = torch.nn.functional.unfold(x_img[i : i + 1], 3, padding=1)
        G = twins.conv2d_per_sample_grad(unfolded, 2 * out.detach().flatten(2))
        torch.testing.assert_close(G[0].reshape(conv.weight.shape), grad_w)


def test_twin_dots_equal_dots_of_materialised_gradients():
    x, g, v = random((4, 3, 6)), random((4, 3, 5), seed=1), random((5, 6), seed=2)
    G = twins.linear_per_sample_grad(x, g)
    torch.testing.assert_close(twins.linear_per_sample_grad_dot(x, g, v), (G * v).sum((1, 2)))
    x, g, v = random((4, 6, 10)), random((4, 3, 10), seed=1), random((3, 6), seed=2)
    G = twins.conv2d_per_sample_grad(x, g)
    torch.testing.assert_close(twins.conv2d_per_sample_grad_dot(x, g, v), (G * v).sum((1, 2)))


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("x_shape", "out"), LINEAR_SHAPES)
def test_native_linear_matches_twin(dtype, x_shape, out):
    x = random(x_shape, dtype)
    g = random(x_shape[:-1] + (out,), dtype, seed=1)
    v = random((out, x_shape[-1]), dtype, seed=2)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(
        NATIVE.linear_per_sample_grad(x, g),
        twins.linear_per_sample_grad(x, g),
        atol=atol,
        rtol=rtol,
    )
    torch.testing.assert_close(
        NATIVE.linear_per_sample_grad_dot(x, g, v),
        twins.linear_per_sample_grad_dot(x, g, v),
        atol=atol,
        rtol=rtol,
    )


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "K", "L", "C_out"), CONV_SHAPES)
def test_native_conv2d_matches_twin(dtype, n, K, L, C_out):
    x, g, v = (
        random((n, K, L), dtype),
        random((n, C_out, L), dtype, 1),
        random((C_out, K), dtype, 2),
    )
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(
        NATIVE.conv2d_per_sample_grad(x, g),
        twins.conv2d_per_sample_grad(x, g),
        atol=atol,
        rtol=rtol,
    )
    torch.testing.assert_close(
        NATIVE.conv2d_per_sample_grad_dot(x, g, v),
        twins.conv2d_per_sample_grad_dot(x, g, v),
        atol=atol,
        rtol=rtol,
    )


@requires_native
def test_native_per_sample_ops_accept_non_contiguous_inputs():
    x, g, v = random((4, 3, 6)), random((4, 3, 5), seed=1), random((5, 6), seed=2)
    xs, gs, vs = noncontiguous(x), noncontiguous(g), noncontiguous(v)
    assert not xs.is_contiguous()
    torch.testing.assert_close(
        NATIVE.linear_per_sample_grad(xs, gs), twins.linear_per_sample_grad(x, g)
    )
    torch.testing.assert_close(
        NATIVE.linear_per_sample_grad_dot(xs, gs, vs), twins.linear_per_sample_grad_dot(x, g, v)
    )
    x, g, v = random((3, 6, 10)), random((3, 4, 10), seed=1), random((4, 6), seed=2)
    xs, gs, vs = noncontiguous(x), noncontiguous(g), noncontiguous(v)
    torch.testing.assert_close(
        NATIVE.conv2d_per_sample_grad(xs, gs), twins.conv2d_per_sample_grad(x, g)
    )
    torch.testing.assert_close(
        NATIVE.conv2d_per_sample_grad_dot(xs, gs, vs), twins.conv2d_per_sample_grad_dot(x, g, v)
    )


@pytest.mark.parametrize("implementation", [pytest.param("native", marks=requires_native), "twin"])
def test_per_sample_ops_name_the_bad_argument(implementation):
    source = NATIVE if implementation == "native" else twins
    x, g = random((4, 3, 6)), random((4, 3, 5))
    with pytest.raises(RuntimeError, match="grad_out must be"):
        source.linear_per_sample_grad(x, g[:, :2])
    with pytest.raises(RuntimeError, match=r"v must be \[5, 6\]"):
        source.linear_per_sample_grad_dot(x, g, random((6, 5)))
    with pytest.raises(RuntimeError, match=r"grad_out must be \[n=4, C_out, L=3\]"):
        source.conv2d_per_sample_grad(x.transpose(1, 2), g[:, :, :2])


def test_wrappers_agree_with_twins():
    x, g, v = random((4, 3, 6)), random((4, 3, 5), seed=1), random((5, 6), seed=2)
    torch.testing.assert_close(
        ops.linear_per_sample_grad(x, g), twins.linear_per_sample_grad(x, g)
    )
    torch.testing.assert_close(
        ops.linear_per_sample_grad_dot(x, g, v), twins.linear_per_sample_grad_dot(x, g, v)
    )
    x, g, v = random((3, 6, 10)), random((3, 4, 10), seed=1), random((4, 6), seed=2)
    torch.testing.assert_close(
        ops.conv2d_per_sample_grad(x, g), twins.conv2d_per_sample_grad(x, g)
    )
    torch.testing.assert_close(
        ops.conv2d_per_sample_grad_dot(x, g, v), twins.conv2d_per_sample_grad_dot(x, g, v)
    )


def _inputs(op):
    if op.startswith("linear"):
        args = [random((3, 2, 4)), random((3, 2, 5), seed=1), random((5, 4), seed=2)]
    else:
        args = [random((3, 4, 6)), random((3, 2, 6), seed=1), random((2, 4), seed=2)]
    return [t.requires_grad_() for t in (args if op.endswith("dot") else args[:2])]


OPS = [
    "linear_per_sample_grad",
    "linear_per_sample_grad_dot",
    "conv2d_per_sample_grad",
    "conv2d_per_sample_grad_dot",
]


@requires_native
@pytest.mark.parametrize("op", OPS)
def test_opcheck_and_gradcheck(op):
    native = getattr(NATIVE, op)
    inputs = _inputs(op)
    torch.library.opcheck(native, tuple(inputs))
    torch.library.opcheck(native, tuple(t.detach() for t in inputs))
    assert torch.autograd.gradcheck(native, inputs)
    assert torch.autograd.gradgradcheck(native, inputs)
