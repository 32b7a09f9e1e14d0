"""Shape checks shared by the pure-PyTorch twins and the ``register_fake`` kernels.

They use ``torch._check`` so that they also work on fake tensors, and their messages name the
argument and the expected shape, like the ``TORCH_CHECK`` messages of the native kernels.
"""

import torch
from torch import Tensor


def _check(condition: bool, message: str) -> None:
    torch._check(condition, lambda: message)


def check_head(A: Tensor, P: Tensor, W: Tensor, b: Tensor | None, w_name: str, b_name: str) -> None:
    """A [n, d], P [n, C], and k directions shaped like the head's (weight, bias): W [k, C, d],
    b [k, C] or None; one floating dtype."""
    _check(A.dim() == 2, f"A must be [n, d] features, got shape {tuple(A.shape)}")
    n, d = A.shape
    _check(
        P.dim() == 2 and P.shape[0] == n,
        f"P must be [n={n}, C] probabilities, got shape {tuple(P.shape)}",
    )
    C = P.shape[1]
    _check(
        W.dim() == 3 and W.shape[1:] == (C, d),
        f"{w_name} must be [k, C={C}, d={d}] (k directions), got shape {tuple(W.shape)}",
    )
    _check(A.dtype.is_floating_point, f"A must be floating point, got {A.dtype}")
    dtypes = [P.dtype, W.dtype] + ([b.dtype] if b is not None else [])
    _check(
        all(dt == A.dtype for dt in dtypes),
        f"A, P, {w_name} and {b_name} must share one dtype, got {A.dtype} and {dtypes}",
    )
    if b is not None:
        k = W.shape[0]
        _check(b.shape == (k, C), f"{b_name} must be [k={k}, C={C}], got shape {tuple(b.shape)}")


def check_labels(y: Tensor, n: int) -> None:
    """y int64 [n]."""
    _check(
        y.dtype == torch.int64 and y.shape == (n,),
        f"y must be int64 [n={n}] labels, got {y.dtype} shape {tuple(y.shape)}",
    )


def check_lissa_update(v: Tensor, g: Tensor, hv: Tensor) -> None:
    """v, g and hv share one shape and dtype."""
    _check(
        g.shape == v.shape and hv.shape == v.shape,
        f"g and hv must have v's shape {tuple(v.shape)}, got {tuple(g.shape)} and "
        f"{tuple(hv.shape)}",
    )
    _check(
        g.dtype == v.dtype and hv.dtype == v.dtype,
        f"g and hv must have v's dtype {v.dtype}, got {g.dtype} and {hv.dtype}",
    )


def check_lissa_params(damping: float, scale: float, depth: int, batch_size: int | None) -> None:
    """damping >= 0, scale > 0, depth >= 0, batch_size None or > 0."""
    _check(damping >= 0, f"damping must be >= 0, got {damping}")
    _check(scale > 0, f"scale must be > 0, got {scale}")
    _check(depth >= 0, f"depth must be >= 0, got {depth}")
    _check(batch_size is None or batch_size > 0, f"batch_size must be > 0, got {batch_size}")


def check_linear(x: Tensor, grad_out: Tensor) -> None:
    """x [n, *, in] and grad_out [n, *, out] with the same leading dims."""
    _check(x.dim() >= 2, f"x must be [n, *, in], got shape {tuple(x.shape)}")
    _check(
        grad_out.dim() == x.dim() and grad_out.shape[:-1] == x.shape[:-1],
        f"grad_out must be [{', '.join(str(s) for s in x.shape[:-1])}, out] to match x "
        f"{tuple(x.shape)}, got shape {tuple(grad_out.shape)}",
    )
    _check(
        grad_out.dtype == x.dtype,
        f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}",
    )


def check_conv2d(x_unfolded: Tensor, grad_out: Tensor) -> None:
    """x_unfolded [n, K, L] and grad_out [n, C_out, L]."""
    _check(
        x_unfolded.dim() == 3, f"x_unfolded must be [n, K, L], got shape {tuple(x_unfolded.shape)}"
    )
    n, _, L = x_unfolded.shape
    _check(
        grad_out.dim() == 3 and grad_out.shape[0] == n and grad_out.shape[2] == L,
        f"grad_out must be [n={n}, C_out, L={L}], got shape {tuple(grad_out.shape)}",
    )
    _check(
        grad_out.dtype == x_unfolded.dtype,
        f"grad_out must have x_unfolded's dtype {x_unfolded.dtype}, got {grad_out.dtype}",
    )


def check_vector(v: Tensor, rows: int, cols: int, like: Tensor) -> None:
    """v [rows, cols] with like's dtype."""
    _check(v.shape == (rows, cols), f"v must be [{rows}, {cols}], got shape {tuple(v.shape)}")
    _check(v.dtype == like.dtype, f"v must have dtype {like.dtype}, got {v.dtype}")
