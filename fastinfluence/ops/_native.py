"""``register_fake`` (shape inference for torch.compile / meta tensors) and autograd of the
native ops; imported by ``fastinfluence.ops`` only when ``fastinfluence._C`` is loaded.

Backward formulas (gout the incoming gradient; sums over repeated indices):
- linear G[n,o,i] = g[n,s,o] x[n,s,i]:  dx = g gG,  dg = x gGᵀ.
- linear dot out[n] = g[n,s,o] v[o,i] x[n,s,i]:  dx = gout·(g v),  dg = gout·(x vᵀ),
  dv = gout[n] g[n,s,o] x[n,s,i].
- conv2d G[n,c,k] = g[n,c,l] x[n,k,l]:  dx = gGᵀ g,  dg = gG x.
- conv2d dot out[n] = v[c,k] g[n,c,l] x[n,k,l]:  dx = gout·(vᵀ g),  dg = gout·(v x),
  dv = gout[n] g[n,c,l] x[n,k,l].
- head scores out[i,j] = −(p_i − y_i)ᵀ s_ij, s_ij = Sw[j] a_i + Sb[j]:
  ds[i,j] = −gout[i,j]·(p_i − y_i),  dA[i] = Σ_j Sw[j]ᵀ ds[i,j],  dSw[j] = Σ_i ds[i,j] a_iᵀ,
  dSb[j] = Σ_i ds[i,j],  dP[i] = −Σ_j gout[i,j]·s_ij.
"""

import torch
from torch import Tensor

from fastinfluence.ops import _checks
from fastinfluence.ops.twins import as_samples


def _needs(ctx, index: int) -> bool:
    return ctx.needs_input_grad[index]


# --- fake kernels ------------------------------------------------------------------------


@torch.library.register_fake("fastinfluence::head_hvp")
def _head_hvp_fake(A, P, Vw, Vb, damping):
    _checks.check_head(A, P, Vw, Vb, "Vw", "Vb")
    return Vw.new_empty(Vw.shape), Vw.new_empty((0,) if Vb is None else Vb.shape)


@torch.library.register_fake("fastinfluence::head_scores")
def _head_scores_fake(A, P, y, Sw, Sb):
    _checks.check_head(A, P, Sw, Sb, "Sw", "Sb")
    _checks.check_labels(y, A.shape[0])
    return A.new_empty((A.shape[0], Sw.shape[0]))


@torch.library.register_fake("fastinfluence::lissa_update_")
def _lissa_update_fake(v, g, hv, damping, scale):
    _checks.check_lissa_update(v, g, hv)


@torch.library.register_fake("fastinfluence::head_lissa")
def _head_lissa_fake(A, P, Gw, Gb, damping, scale, depth, batch_size, seed):
    _checks.check_head(A, P, Gw, Gb, "Gw", "Gb")
    _checks.check_lissa_params(damping, scale, depth, batch_size)
    return Gw.new_empty(Gw.shape), Gw.new_empty((0,) if Gb is None else Gb.shape)


@torch.library.register_fake("fastinfluence::linear_per_sample_grad")
def _linear_grad_fake(x, grad_out):
    _checks.check_linear(x, grad_out)
    return x.new_empty((x.shape[0], grad_out.shape[-1], x.shape[-1]))


@torch.library.register_fake("fastinfluence::linear_per_sample_grad_dot")
def _linear_grad_dot_fake(x, grad_out, v):
    _checks.check_linear(x, grad_out)
    _checks.check_vector(v, grad_out.shape[-1], x.shape[-1], x)
    return x.new_empty((x.shape[0],))


@torch.library.register_fake("fastinfluence::conv2d_per_sample_grad")
def _conv2d_grad_fake(x_unfolded, grad_out):
    _checks.check_conv2d(x_unfolded, grad_out)
    return x_unfolded.new_empty((x_unfolded.shape[0], grad_out.shape[1], x_unfolded.shape[1]))


@torch.library.register_fake("fastinfluence::conv2d_per_sample_grad_dot")
def _conv2d_grad_dot_fake(x_unfolded, grad_out, v):
    _checks.check_conv2d(x_unfolded, grad_out)
    _checks.check_vector(v, grad_out.shape[1], x_unfolded.shape[1], x_unfolded)
    return x_unfolded.new_empty((x_unfolded.shape[0],))


# --- autograd ------------------------------------------------------------------------------


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))


def _linear_grad_backward(ctx, gG):
    x, grad_out = ctx.saved_tensors
    x3, g3 = as_samples(x), as_samples(grad_out)
    dx = torch.bmm(g3, gG).reshape(x.shape) if _needs(ctx, 0) else None
    dg = torch.bmm(x3, gG.transpose(1, 2)).reshape(grad_out.shape) if _needs(ctx, 1) else None
    return dx, dg


def _linear_grad_dot_backward(ctx, gout):
    x, grad_out, v = ctx.saved_tensors
    x3, g3 = as_samples(x), as_samples(grad_out)
    weight = gout[:, None, None]
    dx = (weight * (g3 @ v)).reshape(x.shape) if _needs(ctx, 0) else None
    dg = (weight * (x3 @ v.T)).reshape(grad_out.shape) if _needs(ctx, 1) else None
    dv = torch.einsum("n,nso,nsi->oi", gout, g3, x3) if _needs(ctx, 2) else None
    return dx, dg, dv


def _conv2d_grad_backward(ctx, gG):
    x_unfolded, grad_out = ctx.saved_tensors
    dx = torch.bmm(gG.transpose(1, 2), grad_out) if _needs(ctx, 0) else None
    dg = torch.bmm(gG, x_unfolded) if _needs(ctx, 1) else None
    return dx, dg


def _conv2d_grad_dot_backward(ctx, gout):
    x_unfolded, grad_out, v = ctx.saved_tensors
    weight = gout[:, None, None]
    dx = weight * (v.T @ grad_out) if _needs(ctx, 0) else None
    dg = weight * (v @ x_unfolded) if _needs(ctx, 1) else None
    dv = torch.einsum("n,ncl,nkl->ck", gout, grad_out, x_unfolded) if _needs(ctx, 2) else None
    return dx, dg, dv


def _head_scores_setup(ctx, inputs, output):
    A, P, y, Sw, Sb = inputs
    ctx.has_bias = Sb is not None
    ctx.save_for_backward(A, P, y, Sw, *([Sb] if Sb is not None else []))


def _head_scores_backward(ctx, gout):
    A, P, y, Sw, *bias = ctx.saved_tensors
    (n, d), (k, C) = A.shape, Sw.shape[:2]
    residual = P - torch.nn.functional.one_hot(y, C).to(P.dtype)
    ds = (-gout[:, :, None] * residual[:, None, :]).reshape(n, k * C)
    dA = ds @ Sw.reshape(k * C, d) if _needs(ctx, 0) else None
    if _needs(ctx, 1):
        S = (A @ Sw.reshape(k * C, d).T).reshape(n, k, C) + (bias[0] if ctx.has_bias else 0)
        dP = -(gout[:, :, None] * S).sum(dim=1)
    else:
        dP = None
    dSw = (ds.T @ A).reshape(k, C, d) if _needs(ctx, 3) else None
    dSb = ds.sum(dim=0).reshape(k, C) if ctx.has_bias and _needs(ctx, 4) else None
    return dA, dP, None, dSw, dSb


torch.library.register_autograd(
    "fastinfluence::linear_per_sample_grad", _linear_grad_backward, setup_context=_save_inputs
)
torch.library.register_autograd(
    "fastinfluence::linear_per_sample_grad_dot",
    _linear_grad_dot_backward,
    setup_context=_save_inputs,
)
torch.library.register_autograd(
    "fastinfluence::conv2d_per_sample_grad", _conv2d_grad_backward, setup_context=_save_inputs
)
torch.library.register_autograd(
    "fastinfluence::conv2d_per_sample_grad_dot",
    _conv2d_grad_dot_backward,
    setup_context=_save_inputs,
)
torch.library.register_autograd(
    "fastinfluence::head_scores", _head_scores_backward, setup_context=_head_scores_setup
)
