"""Typed entry points of the native ops (docs/design.md §3 item 4).

Each function runs the registered op ``torch.ops.fastinfluence.<name>`` when the extension has
a kernel for the inputs' device and that kernel beats the pure-PyTorch twin there
(``NATIVE_DEFAULT``, from ``benchmarks/bench_ops.py``); otherwise it runs the twin in
``fastinfluence.ops.twins``. Running a twin because the extension is missing is reported
once by a warning.
"""

import torch
from torch import Tensor

from fastinfluence import _extension
from fastinfluence.ops import twins

if _extension.loaded():
    from fastinfluence.ops import _native  # noqa: F401  (fake kernels and autograd)

__all__ = [
    "NATIVE_DEFAULT",
    "conv2d_per_sample_grad",
    "conv2d_per_sample_grad_dot",
    "head_hvp",
    "head_lissa",
    "head_scores",
    "linear_per_sample_grad",
    "linear_per_sample_grad_dot",
    "lissa_update_",
    "twins",
    "use_native",
]

# Ops whose native kernel is the default, per device type; the others run the twin. On CPU the
# twins of the per-sample gradient ops (batched MKL GEMMs) match or beat the native loops (by
# up to 6x, benchmarks/README_ops.md). On CUDA (not yet measured) the plain per-sample
# gradients go to cuBLAS through the twin; the dots, which the native kernels fuse, stay native.
_PER_SAMPLE = frozenset(
    {
        "linear_per_sample_grad",
        "linear_per_sample_grad_dot",
        "conv2d_per_sample_grad",
        "conv2d_per_sample_grad_dot",
    }
)
NATIVE_DEFAULT: dict[str, frozenset[str]] = {
    "cpu": frozenset(_extension.OPS) - _PER_SAMPLE,
    "cuda": frozenset(_extension.OPS) - {"linear_per_sample_grad", "conv2d_per_sample_grad"},
}


def use_native(op: str, like: Tensor) -> bool:
    """Whether ``op`` on tensors like ``like`` runs natively (else its twin, warning once if the
    native kernel is missing rather than slower)."""
    device_type = like.device.type
    if op not in NATIVE_DEFAULT.get(device_type, frozenset()):
        return False
    if _extension.has_kernel(op, device_type):
        return True
    _extension.warn_twin_fallback(op, device_type)
    return False


def _none_if_empty(bias: Tensor, given: Tensor | None) -> Tensor | None:
    """The native ops return an empty bias output for a head without bias: map it to None."""
    return None if given is None else bias


def head_hvp(
    A: Tensor, P: Tensor, Vw: Tensor, Vb: Tensor | None, damping: float
) -> tuple[Tensor, Tensor | None]:
    """Hessian of the mean softmax-CE over the rows of A w.r.t. (W, b), times k directions
    (Vw [k, C, d], Vb [k, C] or None) in one pass over A, plus damping·V.

    Per direction j: ``U_j = A Vw[j]ᵀ + Vb[j]`` [n, C], ``R_j = P⊙U_j − P⊙rowsum(P⊙U_j)``;
    returns ``HVw[j] = R_jᵀ A / n + damping·Vw[j]`` ([k, C, d]) and
    ``HVb[j] = colsum(R_j)/n + damping·Vb[j]`` ([k, C]; None when Vb is None).
    A [n, d] features, P [n, C] softmax probabilities.
    """
    if not use_native("head_hvp", A):
        return twins.head_hvp(A, P, Vw, Vb, damping)
    HVw, HVb = torch.ops.fastinfluence.head_hvp(A, P, Vw, Vb, damping)
    return HVw, _none_if_empty(HVb, Vb)


def head_scores(A: Tensor, P: Tensor, y: Tensor, Sw: Tensor, Sb: Tensor | None) -> Tensor:
    """Influence scores of a softmax-CE head along k directions, in one pass over A:
    ``scores[i, j] = −(p_i − onehot(y_i))ᵀ (Sw[j] a_i + Sb[j])``.

    A [n, d], P [n, C], y int64 [n] in [0, C), Sw [k, C, d], Sb [k, C] or None; returns [n, k]
    (positive = harmful). Differentiable in A, P, Sw and Sb.
    """
    if not use_native("head_scores", A):
        return twins.head_scores(A, P, y, Sw, Sb)
    return torch.ops.fastinfluence.head_scores(A, P, y, Sw, Sb)


def lissa_update_(v: Tensor, g: Tensor, hv: Tensor, damping: float, scale: float) -> Tensor:
    """In place ``v ← g + (1 − damping/scale)·v − hv/scale`` (one pass); returns v."""
    if not use_native("lissa_update_", v):
        return twins.lissa_update_(v, g, hv, damping, scale)
    torch.ops.fastinfluence.lissa_update_(v, g, hv, damping, scale)
    return v


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
    """The whole head LiSSA recursion in one call, for k right-hand sides g = (Gw [k, C, d],
    Gb [k, C] or None); returns ``h_depth/scale ≈ (H + damping·I)⁻¹ g`` ([k, C, d], [k, C]).

    ``h₀ = g``, ``h_{t+1} = g + (1 − damping/scale)·h_t − H_B h_t / scale``, with ``H_B`` the
    head Hessian (``head_hvp`` without damping) on ``batch_size`` rows drawn uniformly with
    replacement (``twins.lissa_batch_indices(seed, t, batch_size, n)``; the same rows on
    every device), or on all rows when ``batch_size`` is None or >= n.
    """
    if not use_native("head_lissa", A):
        return twins.head_lissa(A, P, Gw, Gb, damping, scale, depth, batch_size, seed)
    Xw, Xb = torch.ops.fastinfluence.head_lissa(
        A, P, Gw, Gb, damping, scale, depth, batch_size, seed
    )
    return Xw, _none_if_empty(Xb, Gb)


def linear_per_sample_grad(x: Tensor, grad_out: Tensor) -> Tensor:
    """Per-sample Linear weight gradients ``G_n = Σ_s grad_out[n,s]ᵀ x[n,s]`` [n, out, in].

    x [n, *, in] (the layer input), grad_out [n, *, out] (gradient w.r.t. the layer output);
    the sequence dims ``*`` are summed over.
    """
    if not use_native("linear_per_sample_grad", x):
        return twins.linear_per_sample_grad(x, grad_out)
    return torch.ops.fastinfluence.linear_per_sample_grad(x, grad_out)


def linear_per_sample_grad_dot(x: Tensor, grad_out: Tensor, v: Tensor) -> Tensor:
    """``⟨G_n, v⟩ = Σ_s grad_out[n,s]ᵀ v x[n,s]`` [n] without materialising G; v [out, in]."""
    if not use_native("linear_per_sample_grad_dot", x):
        return twins.linear_per_sample_grad_dot(x, grad_out, v)
    return torch.ops.fastinfluence.linear_per_sample_grad_dot(x, grad_out, v)


def conv2d_per_sample_grad(x_unfolded: Tensor, grad_out: Tensor) -> Tensor:
    """Per-sample Conv2d weight gradients ``G_n = grad_out[n] x_unfolded[n]ᵀ`` [n, C_out, K].

    x_unfolded [n, K, L] = ``F.unfold`` of the input (K = C_in·kh·kw, L output positions),
    grad_out [n, C_out, L]; reshape G to [n, C_out, C_in, kh, kw] for the weight's layout.
    """
    if not use_native("conv2d_per_sample_grad", x_unfolded):
        return twins.conv2d_per_sample_grad(x_unfolded, grad_out)
    return torch.ops.fastinfluence.conv2d_per_sample_grad(x_unfolded, grad_out)


def conv2d_per_sample_grad_dot(x_unfolded: Tensor, grad_out: Tensor, v: Tensor) -> Tensor:
    """``⟨G_n, v⟩ = Σ_l grad_out[n,:,l]ᵀ v x_unfolded[n,:,l]`` [n] without materialising G;
    v [C_out, K]."""
    if not use_native("conv2d_per_sample_grad_dot", x_unfolded):
        return twins.conv2d_per_sample_grad_dot(x_unfolded, grad_out, v)
    return torch.ops.fastinfluence.conv2d_per_sample_grad_dot(x_unfolded, grad_out, v)
