"""lissa_update_, head_lissa (k right-hand sides per call) and the shared minibatch sampler."""

import pytest
import torch
from conftest import TOLERANCE, head_problem, noncontiguous, requires_native

from fastinfluence import ops
from fastinfluence.ops import twins

NATIVE = torch.ops.fastinfluence


def explicit_head_hessian(A, P, bias):
    """Dense (H + 0·I) of the head: the twin HVP of every unit vector at once."""
    C, d = P.shape[1], A.shape[1]
    size = C * d + (C if bias else 0)
    units = torch.eye(size, dtype=A.dtype)
    HVw, HVb = twins.head_hvp(
        A, P, units[:, : C * d].reshape(size, C, d), units[:, C * d :] if bias else None, 0
    )
    columns = torch.cat([HVw.reshape(size, C * d)] + ([HVb] if bias else []), dim=1)
    return columns.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("numel", [0, 1, 17, 40000])
@pytest.mark.parametrize(
    "implementation", [pytest.param("native", marks=requires_native), "wrapper"]
)
def test_lissa_update_matches_formula(dtype, numel, implementation):
    gen = torch.Generator().manual_seed(numel)
    v, g, hv = (torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    expected = g + (1 - 0.2 / 4.0) * v - hv / 4.0
    if implementation == "native":
        NATIVE.lissa_update_(v, g, hv, 0.2, 4.0)
    else:
        assert ops.lissa_update_(v, g, hv, 0.2, 4.0) is v
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(v, expected, atol=atol, rtol=rtol)


@requires_native
def test_lissa_update_writes_through_non_contiguous_v():
    gen = torch.Generator().manual_seed(0)
    v, g, hv = (torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    v_view = noncontiguous(v)
    assert not v_view.is_contiguous()
    expected = twins.lissa_update_(v.clone(), g, hv, 0.1, 2.0)
    NATIVE.lissa_update_(v_view, noncontiguous(g), hv, 0.1, 2.0)
    torch.testing.assert_close(v_view, expected)


@requires_native
def test_opcheck_lissa_ops():
    A, P, _, Gw, Gb = head_problem(16, 5, 3, k=2)
    torch.library.opcheck(NATIVE.lissa_update_, (Gw.clone(), Gw, Gw * 2, 0.1, 3.0))
    torch.library.opcheck(NATIVE.head_lissa, (A, P, Gw, Gb, 0.1, 3.0, 5, None, 0))
    torch.library.opcheck(NATIVE.head_lissa, (A, P, Gw, None, 0.1, 3.0, 5, 4, 7))


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_size", [None, 200, 5, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_native_head_lissa_matches_twin(dtype, batch_size, bias, k):
    """Full batch is deterministic; minibatches come from the same counter-based sampler."""
    A, P, _, Gw, Gb = head_problem(37, 11, 3, dtype=dtype, bias=bias, k=k)
    atol, rtol = TOLERANCE[dtype]
    Xw, Xb = NATIVE.head_lissa(A, P, Gw, Gb, 0.05, 5.0, 30, batch_size, 1234)
    expected_w, expected_b = twins.head_lissa(A, P, Gw, Gb, 0.05, 5.0, 30, batch_size, 1234)
    torch.testing.assert_close(Xw, expected_w, atol=atol, rtol=rtol)
    if bias:
        torch.testing.assert_close(Xb, expected_b, atol=atol, rtol=rtol)
    else:
        assert Xb.shape == (0,)


@requires_native
def test_native_head_lissa_handles_empty_set_and_zero_depth():
    A, P, _, Gw, Gb = head_problem(0, 4, 3)
    Xw, Xb = NATIVE.head_lissa(A, P, Gw, Gb, 0.5, 2.0, 10, 8, 0)
    # No rows: H = 0, and every step is h ← g + (1 − damping/scale)·h.
    torch.testing.assert_close(Xw, twins.head_lissa(A, P, Gw, Gb, 0.5, 2.0, 10, 8, 0)[0])
    A, P, _, Gw, Gb = head_problem(9, 4, 3)
    Xw, Xb = NATIVE.head_lissa(A, P, Gw, Gb, 0.5, 2.0, 0, None, 0)
    torch.testing.assert_close(Xw, Gw / 2.0)
    torch.testing.assert_close(Xb, Gb / 2.0)


@pytest.mark.parametrize("bias", [True, False])
def test_head_lissa_converges_to_damped_inverse_hvp(bias):
    A, P, _, Gw, Gb = head_problem(60, 4, 3, bias=bias, k=2)
    damping = 0.1
    H = explicit_head_hessian(A, P, bias)
    g = torch.cat([Gw.flatten(1)] + ([Gb] if bias else []), dim=1)  # [k, p]
    expected = torch.linalg.solve(H + damping * torch.eye(g.shape[1], dtype=g.dtype), g.T).T
    scale = 2 * (torch.linalg.eigvalsh(H).max().item() + damping)
    Xw, Xb = ops.head_lissa(A, P, Gw, Gb, damping, scale, 2000, None, 0)
    result = torch.cat([Xw.flatten(1)] + ([Xb] if bias else []), dim=1)
    torch.testing.assert_close(result, expected, atol=1e-8, rtol=1e-8)


@requires_native
def test_native_head_lissa_right_hand_sides_share_the_minibatches():
    """Each of k right-hand sides gets what a one-right-hand-side call with its seed gets."""
    A, P, _, Gw, Gb = head_problem(40, 6, 3, k=3)
    Xw, Xb = NATIVE.head_lissa(A, P, Gw, Gb, 0.1, 4.0, 25, 8, 11)
    for j in range(3):
        Xw_j, Xb_j = NATIVE.head_lissa(A, P, Gw[j : j + 1], Gb[j : j + 1], 0.1, 4.0, 25, 8, 11)
        torch.testing.assert_close(Xw[j : j + 1], Xw_j)
        torch.testing.assert_close(Xb[j : j + 1], Xb_j)


def test_stochastic_head_lissa_is_right_on_average():
    """Minibatch LiSSA is biased per run only by sampling noise: averaging many seeds lands near
    the full-batch answer, while each run differs from it."""
    A, P, _, Gw, Gb = head_problem(64, 3, 2)
    full_w, _ = ops.head_lissa(A, P, Gw, Gb, 0.2, 4.0, 150, None, 0)
    runs = torch.stack(
        [ops.head_lissa(A, P, Gw, Gb, 0.2, 4.0, 150, 16, seed)[0] for seed in range(40)]
    )
    assert (runs[0] - full_w).abs().max() > 1e-6
    spread = runs.std(dim=0) / len(runs) ** 0.5
    assert ((runs.mean(dim=0) - full_w).abs() < 5 * spread + 1e-3).all()


def test_sampler_is_uniform_and_deterministic():
    rows = twins.lissa_batch_indices(seed=3, step=2, batch_size=20000, n=10)
    assert torch.equal(rows, twins.lissa_batch_indices(seed=3, step=2, batch_size=20000, n=10))
    assert not torch.equal(
        rows, twins.lissa_batch_indices(seed=4, step=2, batch_size=20000, n=10)
    )
    counts = torch.bincount(rows, minlength=10).double()
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert rows.min() >= 0 and rows.max() < 10
    assert chi2 < 30  # 9 degrees of freedom: p ≈ 5e-4


@pytest.mark.parametrize("implementation", [pytest.param("native", marks=requires_native), "twin"])
def test_head_lissa_rejects_bad_parameters(implementation):
    lissa = NATIVE.head_lissa if implementation == "native" else twins.head_lissa
    A, P, _, Gw, Gb = head_problem(5, 2, 2)
    with pytest.raises(RuntimeError, match="scale must be > 0"):
        lissa(A, P, Gw, Gb, 0.1, 0.0, 3, None, 0)
    with pytest.raises(RuntimeError, match="batch_size must be > 0"):
        lissa(A, P, Gw, Gb, 0.1, 1.0, 3, 0, 0)
    with pytest.raises(RuntimeError, match=r"Gw must be \[k, C=2, d=2\] \(k directions\)"):
        lissa(A, P, Gw[0], Gb, 0.1, 1.0, 3, None, 0)
    with pytest.raises(RuntimeError, match=r"Gb must be \[k=1, C=2\]"):
        lissa(A, P, Gw, Gb[0], 0.1, 1.0, 3, None, 0)
