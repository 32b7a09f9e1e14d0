"""Pure-PyTorch twins of the native ops: the test oracle, and the fallback without ``_C``.

Conventions (docs/design.md §1 and §3 item 3): ``A`` [n, d] are the head's input features, ``P``
[n, C] its softmax probabilities, ``y`` [n] the labels. The head is ``logits = A Wᵀ + b`` and
its loss the mean softmax cross-entropy over the n rows.
"""

import math

import numpy as np
import torch
from torch import Tensor

from fastinfluence.ops import _checks

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def head_hvp(
    A: Tensor, P: Tensor, Vw: Tensor, Vb: Tensor | None, damping: float
) -> tuple[Tensor, Tensor | None]:
    """Head Hessian times k directions plus damping: Vw [k, C, d], Vb [k, C] or None.

    Per direction j: ``U_j = A Vw[j]ᵀ + Vb[j]``, ``R_j = P⊙U_j − P⊙rowsum(P⊙U_j)``,
    ``HVw[j] = R_jᵀ A / n + damping·Vw[j]``, ``HVb[j] = colsum(R_j) / n + damping·Vb[j]``.
    An empty batch has a zero Hessian.
    """
    _checks.check_head(A, P, Vw, Vb, "Vw", "Vb")
    n, d = A.shape
    k, C = Vw.shape[0], P.shape[1]
    U = (A @ Vw.reshape(k * C, d).T).reshape(n, k, C)
    if Vb is not None:
        U = U + Vb
    PU = P[:, None, :] * U
    R = PU - P[:, None, :] * PU.sum(dim=2, keepdim=True)
    rows = max(n, 1)
    HVw = (R.reshape(n, k * C).T @ A).reshape(k, C, d) / rows + damping * Vw
    HVb = None if Vb is None else R.sum(dim=0) / rows + damping * Vb
    return HVw, HVb


def head_scores(A: Tensor, P: Tensor, y: Tensor, Sw: Tensor, Sb: Tensor | None) -> Tensor:
    """Per-row influence scores along k directions Sw [k, C, d], Sb [k, C] or None:
    ``scores[i, j] = −(p_i − onehot(y_i))ᵀ (Sw[j] a_i + Sb[j])`` ([n, k])."""
    _checks.check_head(A, P, Sw, Sb, "Sw", "Sb")
    _checks.check_labels(y, A.shape[0])
    n, d = A.shape
    k, C = Sw.shape[0], P.shape[1]
    S = (A @ Sw.reshape(k * C, d).T).reshape(n, k, C)
    if Sb is not None:
        S = S + Sb
    residual = P - torch.nn.functional.one_hot(y, C).to(P.dtype)
    return -(residual[:, None, :] * S).sum(dim=2)


def lissa_update_(v: Tensor, g: Tensor, hv: Tensor, damping: float, scale: float) -> Tensor:
    """In place: ``v ← g + (1 − damping/scale)·v − hv/scale``; returns v."""
    _checks.check_lissa_update(v, g, hv)
    return v.mul_(1.0 - damping / scale).add_(g).sub_(hv, alpha=1.0 / scale)


def lissa_batch_indices(seed: int, step: int, batch_size: int, n: int) -> Tensor:
    """Rows of LiSSA step ``step``: ``batch_size`` draws, uniform with replacement from [0, n).

    Counter-based, so the native kernels draw the same rows: draw k of step t is
    ``splitmix64(seed + (t·batch_size + k + 1)·φ) mod n`` in uint64 arithmetic, with φ the
    64-bit golden ratio constant.
    """
    counters = np.arange(batch_size, dtype=np.uint64) + np.uint64(step * batch_size + 1)
    z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + counters * np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z % np.uint64(n)).astype(np.int64))


def head_lissa(
    A: Tensor,
    P: Tensor,
    Gw: Tensor,
    Gb: Tensor | None,
    damping: float,
    scale: float,
    depth: int,
    batch_size: int | None,
    seed: int,
) -> tuple[Tensor, Tensor | None]:
    """LiSSA for the head and k right-hand sides g = (Gw [k, C, d], Gb [k, C] or None):
    ``h₀ = g``, ``h_{t+1} = g + (1 − damping/scale)·h_t − H_B h_t/scale``.

    ``H_B`` is the head Hessian (``head_hvp`` without damping) on the rows
    ``lissa_batch_indices(seed, t, batch_size, n)`` (the same for all k), or on all rows when
    ``batch_size`` is None or >= n. Returns ``h_depth / scale`` ≈ ``(H + damping·I)⁻¹ g``.
    """
    _checks.check_head(A, P, Gw, Gb, "Gw", "Gb")
    _checks.check_lissa_params(damping, scale, depth, batch_size)
    n = A.shape[0]
    full_batch = batch_size is None or batch_size >= n
    hw = Gw.clone()
    hb = None if Gb is None else Gb.clone()
    for step in range(depth):
        if full_batch:
            A_B, P_B = A, P
        else:
            rows = lissa_batch_indices(seed, step, batch_size, n).to(A.device)
            A_B, P_B = A[rows], P[rows]
        Hw, Hb = head_hvp(A_B, P_B, hw, hb, 0.0)
        lissa_update_(hw, Gw, Hw, damping, scale)
        if hb is not None:
            lissa_update_(hb, Gb, Hb, damping, scale)
    return hw / scale, None if hb is None else hb / scale


def as_samples(t: Tensor) -> Tensor:
    """[n, *, k] as [n, S, k], S the product of the sequence dims."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def linear_per_sample_grad(x: Tensor, grad_out: Tensor) -> Tensor:
    """Per-sample weight gradients of a Linear: ``G_n = Σ_s grad_out[n,s]ᵀ x[n,s]`` ([n, out, in]).

    ``x`` [n, *, in], ``grad_out`` [n, *, out]; the sequence dims ``*`` are summed over.
    """
    _checks.check_linear(x, grad_out)
    x3, g3 = as_samples(x), as_samples(grad_out)
    return torch.bmm(g3.transpose(1, 2), x3)


def linear_per_sample_grad_dot(x: Tensor, grad_out: Tensor, v: Tensor) -> Tensor:
    """``⟨G_n, v⟩ = Σ_s grad_out[n,s]ᵀ v x[n,s]`` for each sample n ([n]), v [out, in]."""
    _checks.check_linear(x, grad_out)
    _checks.check_vector(v, grad_out.shape[-1], x.shape[-1], x)
    x3, g3 = as_samples(x), as_samples(grad_out)
    return ((g3 @ v) * x3).sum(dim=(1, 2))


def conv2d_per_sample_grad(x_unfolded: Tensor, grad_out: Tensor) -> Tensor:
    """Per-sample Conv2d weight gradients in unfold form: ``G_n = grad_out[n] x_unfolded[n]ᵀ``.

    ``x_unfolded`` [n, K, L] (``torch.nn.functional.unfold`` of the input, K = C_in·kh·kw),
    ``grad_out`` [n, C_out, L]; returns [n, C_out, K].
    """
    _checks.check_conv2d(x_unfolded, grad_out)
    return torch.bmm(grad_out, x_unfolded.transpose(1, 2))


def conv2d_per_sample_grad_dot(x_unfolded: Tensor, grad_out: Tensor, v: Tensor) -> Tensor:
    """``⟨G_n, v⟩ = Σ_l grad_out[n,:,l]ᵀ v x_unfolded[n,:,l]`` per sample n ([n]), v [C_out, K]."""
    _checks.check_conv2d(x_unfolded, grad_out)
    _checks.check_vector(v, grad_out.shape[1], x_unfolded.shape[1], x_unfolded)
    return ((v @ x_unfolded) * grad_out).sum(dim=(1, 2))
