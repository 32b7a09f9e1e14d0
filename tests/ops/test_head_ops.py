"""head_hvp, head_scores (k directions per call): twins against autograd, native kernels
against twins."""

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
    A, _, y, Vw, Vb = head_problem(20, 6, 4, bias=bias, k=3)
    W = torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    P = torch.softmax(A @ W.T + (0 if b is None else b), dim=1)
    params = (W, b) if bias else (W,)
    HVw, HVb = twins.head_hvp(A, P, Vw, Vb, 0.25)
    assert HVw.shape == (3, 4, 6)
    for j in range(3):
        vector = (Vw[j], Vb[j]) if bias else (Vw[j],)
        _, expected = torch.autograd.functional.hvp(
            lambda *p: head_loss(p[0], p[1] if bias else None, A, y), params, vector
        )
        torch.testing.assert_close(HVw[j], expected[0] + 0.25 * Vw[j])
        if bias:
            torch.testing.assert_close(HVb[j], expected[1] + 0.25 * Vb[j])
    assert (HVb is None) == (not bias)


def test_twin_scores_are_minus_per_sample_gradient_dot_direction():
    A, _, y, Sw, Sb = head_problem(9, 5, 3, k=2)
    W, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    P = torch.softmax(A @ W.T + b, dim=1)
    expected = torch.empty(9, 2, dtype=torch.float64)
    for i in range(len(y)):
        gW, gb = torch.autograd.grad(
            head_loss(W.requires_grad_(), b.requires_grad_(), A[i : i + 1], y[i : i + 1]), (W, b)
        )
        for j in range(2):
            expected[i, j] = -((gW * Sw[j]).sum() + (gb * Sb[j]).sum())
    torch.testing.assert_close(twins.head_scores(A, P, y, Sw, Sb), expected)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 5])
def test_native_hvp_matches_twin(dtype, shape, bias, k):
    A, P, _, Vw, Vb = head_problem(*shape, dtype=dtype, bias=bias, k=k)
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
@pytest.mark.parametrize("k", [1, 5])
def test_native_scores_match_twin(dtype, shape, k):
    A, P, y, Sw, Sb = head_problem(*shape, dtype=dtype, seed=1, k=k)
    atol, rtol = TOLERANCE[dtype]
    scores = NATIVE.head_scores(A, P, y, Sw, Sb)
    assert scores.shape == (shape[0], k)
    torch.testing.assert_close(scores, twins.head_scores(A, P, y, Sw, Sb), atol=atol, rtol=rtol)
    torch.testing.assert_close(
        NATIVE.head_scores(A, P, y, Sw, None),
        twins.head_scores(A, P, y, Sw, None),
        atol=atol,
        rtol=rtol,
    )


@requires_native
def test_native_head_ops_take_zero_directions():
    A, P, y, Vw, Vb = head_problem(10, 4, 3, k=0)
    HVw, HVb = NATIVE.head_hvp(A, P, Vw, Vb, 0.1)
    assert HVw.shape == (0, 3, 4) and HVb.shape == (0, 3)
    assert NATIVE.head_scores(A, P, y, Vw, Vb).shape == (10, 0)


@requires_native
def test_native_head_ops_accept_non_contiguous_inputs():
    A, P, y, Vw, Vb = head_problem(50, 12, 3, k=3)
    args = [noncontiguous(t) for t in (A, P, Vw)]
    assert not args[0].is_contiguous() and not args[2].is_contiguous()
    torch.testing.assert_close(
        NATIVE.head_hvp(*args, Vb, 0.0)[0], twins.head_hvp(A, P, Vw, Vb, 0.0)[0]
    )
    torch.testing.assert_close(
        NATIVE.head_scores(args[0], args[1], y, args[2], noncontiguous(Vb)),
        twins.head_scores(A, P, y, Vw, Vb),
    )


@requires_native
def test_native_scores_reject_labels_out_of_range():
    A, P, y, Sw, Sb = head_problem(10, 4, 3, k=2)
    y[3] = 3
    with pytest.raises(RuntimeError, match=r"labels in \[0, C=3\); 1 do not"):
        NATIVE.head_scores(A, P, y, Sw, Sb)


@pytest.mark.parametrize("implementation", [pytest.param("native", marks=requires_native), "twin"])
def test_head_ops_name_the_bad_argument(implementation):
    source = NATIVE if implementation == "native" else twins
    A, P, y, Vw, Vb = head_problem(10, 4, 3, k=2)
    with pytest.raises(RuntimeError, match=r"Vw must be \[k, C=3, d=4\] \(k directions\)"):
        source.head_hvp(A, P, Vw[0], Vb, 0.0)
    with pytest.raises(RuntimeError, match=r"P must be \[n=10, C\]"):
        source.head_hvp(A, P[:5], Vw, Vb, 0.0)
    with pytest.raises(RuntimeError, match=r"Vb must be \[k=2, C=3\]"):
        source.head_hvp(A, P, Vw, Vb[:1], 0.0)
    with pytest.raises(RuntimeError, match=r"Sw must be \[k, C=3, d=4\]"):
        source.head_scores(A, P, y, Vw[:, :, :3], Vb)
    with pytest.raises(RuntimeError, match=r"Sb must be \[k=2, C=3\]"):
        source.head_scores(A, P, y, Vw, Vb[0])


@pytest.mark.parametrize("bias", [True, False])
def test_wrappers_agree_with_twins(bias):
    A, P, y, Vw, Vb = head_problem(40, 9, 3, bias=bias, k=4)
    HVw, HVb = ops.head_hvp(A, P, Vw, Vb, 0.5)
    expected_w, expected_b = twins.head_hvp(A, P, Vw, Vb, 0.5)
    torch.testing.assert_close(HVw, expected_w)
    assert (HVb is None) == (not bias)
    if bias:
        torch.testing.assert_close(HVb, expected_b)
    torch.testing.assert_close(ops.head_scores(A, P, y, Vw, Vb), twins.head_scores(A, P, y, Vw, Vb))


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_head_ops(bias):
    A, P, y, Vw, Vb = head_problem(12, 5, 3, bias=bias, k=2)
    torch.library.opcheck(NATIVE.head_hvp, (A, P, Vw, Vb, 0.1))
    torch.library.opcheck(NATIVE.head_scores, (A, P, y, Vw, Vb))
    A, P, Vw = (t.requires_grad_() for t in (A, P, Vw))
    torch.library.opcheck(NATIVE.head_scores, (A, P, y, Vw, Vb))


@requires_native
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_head_scores(bias):
    A, P, y, Sw, Sb = head_problem(6, 4, 3, bias=bias, k=2)
    inputs = [t.requires_grad_() for t in (A, P, Sw)] + ([Sb.requires_grad_()] if bias else [])

    def scores(A, P, Sw, *Sb):
        return NATIVE.head_scores(A, P, y, Sw, Sb[0] if Sb else None)

    assert torch.autograd.gradcheck(scores, inputs)
    assert torch.autograd.gradgradcheck(scores, inputs)
