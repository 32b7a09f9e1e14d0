"""head_hvp, head_scores: twins against autograd, native kernels against twins."""

import pytest
import torch
from conftest import TOLERANCE, head_problem, noncontiguous, requires_native

from fastinfluence import ops
from fastinfluence.ops import twins

SHAPES = [(0, 5, 3), (1, 1, 2), (7, 33, 3), (130, 70, 5), (64, 16, 1)]
NATIVE = torch.ops.fastinfluence


def head_loss(W, b, A, y):
    logits = A @ W.T + (0 if b is None else b)
    return torch.nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("bias", [True, False])
def test_twin_hvp_is_the_autograd_hessian_of_mean_cross_entropy(bias):
    A, _, y, Vw, Vb = head_problem(20, 6, 4, bias=bias)
    W = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    P = torch.softmax(A @ W.T + (0 if b is None else b), dim=1)
    params = (W, b) if bias else (W,)
    vector = (Vw, Vb) if bias else (Vw,)
    _, expected = torch.autograd.functional.hvp(
        lambda *p: head_loss(p[0], p[1] if bias else None, A, y), params, vector
    )
    HVw, HVb = twins.head_hvp(A, P, Vw, Vb, 0.25)
    torch.testing.assert_close(HVw, expected[0] + 0.25 * Vw)
    if bias:
        torch.testing.assert_close(HVb, expected[1] + 0.25 * Vb)
    else:
        assert HVb is None


def test_twin_scores_are_minus_per_sample_gradient_dot_direction():
    A, _, y, Sw, Sb = head_problem(9, 5, 3)
    W, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    P = torch.softmax(A @ W.T + b, dim=1)
    expected = []
    for i in range(len(y)):
        gW, gb = torch.autograd.grad(
            head_loss(W.requires_grad_(), b.requires_grad_(), A[i : i + 1], y[i : i + 1]), (W, b)
        )
        expected.append(-((gW * Sw).sum() + (gb * Sb).sum()))
    torch.testing.assert_close(twins.head_scores(A, P, y, Sw, Sb), torch.stack(expected))


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_native_hvp_matches_twin(dtype, shape, bias):
    A, P, _, Vw, Vb = head_problem(*shape, dtype=dtype, bias=bias)
    atol, rtol = TOLERANCE[dtype]
    HVw, HVb = NATIVE.head_hvp(A, P, Vw, Vb, 0.1)
    expected_w, expected_b = twins.head_hvp(A, P, Vw, Vb, 0.1)
    torch.testing.assert_close(HVw, expected_w, atol=atol, rtol=rtol)
    if bias:
        torch.testing.assert_close(HVb, expected_b, atol=atol, rtol=rtol)
    else:
        assert HVb.shape == (0,)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_scores_match_twin(dtype, shape):
    A, P, y, Sw, Sb = head_problem(*shape, dtype=dtype, seed=1)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(
        NATIVE.head_scores(A, P, y, Sw, Sb),
        twins.head_scores(A, P, y, Sw, Sb),
        atol=atol,
        rtol=rtol,
    )
    torch.testing.assert_close(
        NATIVE.head_scores(A, P, y, Sw, None), twins.head_scores(A, P, y, Sw, None)
    )


@requires_native
def test_native_head_ops_accept_non_contiguous_inputs():
    A, P, y, Vw, Vb = head_problem(50, 12, 3)
    args = [noncontiguous(t) for t in (A, P, Vw)]
    assert not args[0].is_contiguous()
    torch.testing.assert_close(
        NATIVE.head_hvp(*args, Vb, 0.0)[0], twins.head_hvp(A, P, Vw, Vb, 0.0)[0]
    )
    torch.testing.assert_close(
        NATIVE.head_scores(args[0], args[1], y, args[2], Vb),
        twins.head_scores(A, P, y, Vw, Vb),
    )


@requires_native
def test_native_scores_reject_labels_out_of_range():
    A, P, y, Sw, Sb = head_problem(10, 4, 3)
    y[3] = 3
    with pytest.raises(RuntimeError, match=r"labels in \[0, C=3\)"):
        NATIVE.head_scores(A, P, y, Sw, Sb)


@pytest.mark.parametrize("implementation", [pytest.param("native", marks=requires_native), "twin"])
def test_head_ops_name_the_bad_argument(implementation):
    hvp = NATIVE.head_hvp if implementation == "native" else twins.head_hvp
    A, P, y, Vw, Vb = head_problem(10, 4, 3)
    with pytest.raises(RuntimeError, match=r"Vw must be \[C=3, d=4\]"):
        hvp(A, P, Vw.T, Vb, 0.0)
    with pytest.raises(RuntimeError, match=r"P must be \[n=10, C\]"):
        hvp(A, P[:5], Vw, Vb, 0.0)
    with pytest.raises(RuntimeError, match=r"Vb must be \[C=3\]"):
        hvp(A, P, Vw, Vb[:2], 0.0)


@pytest.mark.parametrize("bias", [True, False])
def test_wrappers_agree_with_twins(bias):
    A, P, y, Vw, Vb = head_problem(40, 9, 3, bias=bias)
    HVw, HVb = ops.head_hvp(A, P, Vw, Vb, 0.5)
    expected_w, expected_b = twins.head_hvp(A, P, Vw, Vb, 0.5)
    torch.testing.assert_close(HVw, expected_w)
    assert (HVb is None) == (not bias)
    if bias:
        torch.testing.assert_close(HVb, expected_b)
    torch.testing.assert_close(
        ops.head_scores(A, P, y, Vw, Vb), twins.head_scores(A, P, y, Vw, Vb)
    )


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_head_ops(bias):
    A, P, y, Vw, Vb = head_problem(12, 5, 3, bias=bias)
    torch.library.opcheck(NATIVE.head_hvp, (A, P, Vw, Vb, 0.1))
    torch.library.opcheck(NATIVE.head_scores, (A, P, y, Vw, Vb))
    A, P, Vw = (t.requires_grad_() for t in (A, P, Vw))
    torch.library.opcheck(NATIVE.head_scores, (A, P, y, Vw, Vb))


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_head_scores(bias):
    A, P, y, Sw, Sb = head_problem(6, 4, 3, bias=bias)
    inputs = [t.requires_grad_() for t in (A, P, Sw)] + ([Sb.requires_grad_()] if bias else [])

    def scores(A, P, Sw, *Sb):
        return NATIVE.head_scores(A, P, y, Sw, Sb[0] if Sb else None)

    assert torch.autograd.gradcheck(scores, inputs)
    assert torch.autograd.gradgradcheck(scores, inputs)
