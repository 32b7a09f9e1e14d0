"""Textbook influence functions in pure autograd: the project's test oracle and benchmark baseline.

Everything here is written the way most published influence code is written: one
``torch.autograd.grad`` call per training sample, Hessian-vector products (HVPs) by double
backward, explicit Hessians built row by row, and LiSSA exactly as in Koh & Liang (2017). It is
slow, and that is fine: clarity comes first, so that each function can be checked by reading it.
The fast engine (``fastinfluence.score`` / ``fastinfluence.Influence``) is tested against it.

Conventions (docs/design.md §1), shared with the engine:

* ``l(z, θ)`` is the per-sample loss (default: cross-entropy on logits), ``L(D, θ)`` its mean.
* ``H`` is the Hessian of the **mean** training loss ``L(D_train, θ)`` with respect to the
  selected parameters ``θ_S`` only, with the model in **eval mode** (BatchNorm running
  statistics, Dropout off).
* **Damping is additive**: ``H_λ = H + λI``. LiSSA's ``scale`` is a *different* knob (it only
  shrinks the Neumann-series step); every solver here returns ``H_λ^{-1} v`` whatever the scale.
* Group influence (Koh & Liang Eq. 7): ``I(z) = -∇L(D_val)ᵀ H_λ^{-1} ∇l(z)``, no ``1/n`` factor.
  Positive means up-weighting ``z`` raises the validation loss: **harmful**.
* Perturbation influence (Eq. 8): ``I_pert(z) = -∇_x (sᵀ ∇_θ l(z))`` with
  ``s = H_λ^{-1} ∇L(D_val)``, a tensor shaped like ``x``.
* Pairwise (Eq. 3): ``I(z_train, z_test) = -∇l(z_test)ᵀ H_λ^{-1} ∇l(z_train)``, an
  ``[n_train, n_test]`` matrix. Self-influence: ``∇l(z)ᵀ H_λ^{-1} ∇l(z)``.

Every function takes the model, the list of selected parameters (``nn.Parameter`` objects of
that model) and data tensors. The model is put in eval mode for the computation, and its
``training`` flag and the parameters' ``requires_grad`` flags are restored afterwards; nothing
is modified. Parameter vectors are flattened in the order of ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastinfluence.modes import eval_mode

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "gauss_newton",
    "hessian",
    "hvp",
    "ihvp",
    "ihvp_direct",
    "influence_scores",
    "lissa",
    "mean_loss_grad",
    "pairwise_influence",
    "per_sample_grads",
    "per_sample_grads_vmap",
    "perturbation_influence",
    "scores_from_ihvp",
    "self_influence",
]


# --------------------------------------------------------------------------- input checks


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The default loss: per-sample cross-entropy on logits."""
    return F.cross_entropy(logits, y, reduction="none")


def _check_params(model: nn.Module, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    owned = {id(p) for p in model.parameters()}
    if not owned:
        raise ValueError("the model has no parameters")
    params = list(params)
    if not params:
        raise ValueError("params is empty: select at least one parameter of the model")
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, nn.Parameter):
            raise ValueError(f"params[{i}] is a {type(p).__name__}, not an nn.Parameter")
        if id(p) not in owned:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model"
            )
        if id(p) in seen:
            raise ValueError(f"params[{i}] appears twice in params")
        seen.add(id(p))
    return params


def _check_data(X: Tensor, y: Tensor, name: str = "data") -> None:
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{name}: X and y must be tensors")
    if X.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{name}: X and y need a leading sample dimension")
    if len(X) != len(y):
        raise ValueError(f"{name}: X has {len(X)} samples but y has {len(y)}")
    if len(X) == 0:
        raise ValueError(f"{name} is empty")
    if X.is_floating_point() and not torch.isfinite(X).all():
        raise ValueError(f"{name}: X contains NaN or Inf")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError(f"{name}: y contains NaN or Inf")


def _check_pair(data: tuple[Tensor, Tensor], name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"{name} must be an (X, y) tuple of tensors")
    X, y = data
    _check_data(X, y, name)
    return X, y


def _check_damping(damping: float) -> None:
    if not damping >= 0:  # also rejects NaN
        raise ValueError(f"damping must be >= 0, got {damping}")


def _check_vector(v: Tensor, p: int, name: str) -> None:
    if not isinstance(v, Tensor) or v.shape != (p,):
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a vector of shape ({p},), got {shape}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf")


def _num_params(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(v: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    sizes = [p.numel() for p in params]
    return [chunk.view_as(p) for chunk, p in zip(v.split(sizes), params, strict=True)]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Dot product of two parameter-shaped lists of tensors (keeps the autograd graph)."""
    return sum((u * w).sum() for u, w in zip(a, b, strict=True))


@contextmanager
def _prepared(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on the selected parameters; both restored on exit
    (each submodule's own ``training`` flag, as the engine's :func:`eval_mode` does)."""
    flags = [p.requires_grad for p in params]
    with eval_mode(model):
        try:
            for p in params:
                p.requires_grad_(True)
            yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)


def _losses(model: nn.Module, X: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Per-sample losses ``[n]`` of the model on ``(X, y)``."""
    losses = loss_fn(model(X), y)
    if losses.shape != (len(X),):
        raise ValueError(
            f"loss_fn must return per-sample losses of shape ({len(X)},), "
            f"got {tuple(losses.shape)} (use reduction='none')"
        )
    return losses


# --------------------------------------------------------------------------- gradients


def per_sample_grads(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Per-sample gradients ``∇_θ l(z_i)`` by a Python loop, one ``autograd.grad`` per sample.

    Returns:
        ``[n, p]`` with row ``i`` the flattened gradient of sample ``i``'s loss w.r.t. ``params``.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    loss_fn = loss_fn or _cross_entropy
    rows = []
    with _prepared(model, params):
        for i in range(len(X)):
            loss = _losses(model, X[i : i + 1], y[i : i + 1], loss_fn).sum()
            grads = torch.autograd.grad(loss, params, materialize_grads=True)
            rows.append(_flatten(grads))
    return torch.stack(rows)


def per_sample_grads_vmap(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-sample gradients by ``torch.func.vmap(torch.func.grad(...))`` and ``functional_call``.

    The model is called functionally on one sample at a time (a batch of one), with the
    selected parameters as the differentiated argument and every other parameter and buffer
    held fixed; ``vmap`` maps that over the samples. ``chunk_size`` bounds how many samples
    are vectorised at once (memory), ``None`` means all.

    Returns:
        ``[n, p]``, equal to :func:`per_sample_grads`.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    loss_fn = loss_fn or _cross_entropy
    name_of = {id(p): name for name, p in model.named_parameters()}
    selected_names = [name_of[id(p)] for p in params]
    fixed = {name: p.detach() for name, p in model.named_parameters()}
    fixed.update(dict(model.named_buffers()))

    def sample_loss(selected: dict[str, Tensor], x: Tensor, target: Tensor) -> Tensor:
        logits = torch.func.functional_call(model, {**fixed, **selected}, (x.unsqueeze(0),))
        return loss_fn(logits, target.unsqueeze(0)).sum()

    per_sample = torch.func.vmap(
        torch.func.grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size
    )
    with _prepared(model, params):
        selected = {name: p.detach() for name, p in zip(selected_names, params, strict=True)}
        grads = per_sample(selected, X, y)
    return torch.cat([grads[name].reshape(len(X), -1) for name in selected_names], dim=1)


def mean_loss_grad(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Gradient of the mean loss ``∇_θ L(D) = (1/n) Σ_i ∇_θ l(z_i)``, flattened to ``[p]``."""
    params = _check_params(model, params)
    _check_data(X, y)
    loss_fn = loss_fn or _cross_entropy
    with _prepared(model, params):
        loss = _losses(model, X, y, loss_fn).mean()
        return _flatten(torch.autograd.grad(loss, params, materialize_grads=True))


# --------------------------------------------------------------------------- curvature


def hvp(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    v: Tensor,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Hessian-vector product ``H v`` of the mean loss over ``(X, y)``, by double backward.

    ``H v = ∇_θ (∇_θ L(D, θ)ᵀ v)``: one backward pass with ``create_graph=True`` gives the
    gradient as a differentiable function of θ, its dot product with the constant ``v`` is a
    scalar, and a second backward pass differentiates that scalar. No damping is added.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    _check_vector(v, _num_params(params), "v")
    loss_fn = loss_fn or _cross_entropy
    with _prepared(model, params):
        return _double_backward_hvp(model, params, X, y, v, loss_fn)


def _double_backward_hvp(
    model: nn.Module,
    params: list[nn.Parameter],
    X: Tensor,
    y: Tensor,
    v: Tensor,
    loss_fn: LossFn,
) -> Tensor:
    loss = _losses(model, X, y, loss_fn).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
    grad_dot_v = _dot(grads, _unflatten(v.detach(), params))
    if not grad_dot_v.requires_grad:  # the gradient does not depend on θ: H = 0
        return torch.zeros_like(v)
    return _flatten(torch.autograd.grad(grad_dot_v, params, materialize_grads=True))


def hessian(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Explicit Hessian ``[p, p]`` of the mean loss over ``(X, y)`` w.r.t. ``params``.

    Built row by row: row ``k`` is ``∇_θ (∂L/∂θ_k)``, one double-backward pass per parameter
    entry (``p`` passes), so only usable for small ``p``. No damping is added.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    loss_fn = loss_fn or _cross_entropy
    p = _num_params(params)
    with _prepared(model, params):
        loss = _losses(model, X, y, loss_fn).mean()
        grad = _flatten(
            torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        )
        H = torch.zeros(p, p, dtype=grad.dtype, device=grad.device)
        if not grad.requires_grad:  # the gradient does not depend on θ: H = 0
            return H
        for k in range(p):
            row = torch.autograd.grad(grad[k], params, retain_graph=True, materialize_grads=True)
            H[k] = _flatten(row)
    return H


def gauss_newton(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Explicit Gauss-Newton matrix ``G = (1/n) Σ_i J_iᵀ (∂²l_i/∂z²) J_i`` ``[p, p]``.

    ``J_i = ∂z_i/∂θ`` is sample ``i``'s Jacobian of the model output, built row by row (one
    backward pass per output entry), and ``∂²l_i/∂z²`` the Hessian of its loss in the output
    (for softmax cross-entropy ``diag(p_i) − p_i p_iᵀ``). No damping is added.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    loss_fn = loss_fn or _cross_entropy
    p = _num_params(params)
    total = torch.zeros(p, p, dtype=X.dtype, device=X.device)
    with _prepared(model, params):
        for index in range(len(X)):
            output = model(X[index:index + 1])[0]
            rows = [
                _flatten(torch.autograd.grad(entry, params, retain_graph=True,
                                             materialize_grads=True))
                for entry in output.reshape(-1)
            ]
            jacobian = torch.stack(rows)
            target = y[index:index + 1]

            def sample_loss(z: Tensor, target=target, shape=output.shape) -> Tensor:
                return loss_fn(z.reshape(1, *shape), target)[0]

            curvature = torch.autograd.functional.hessian(sample_loss,
                                                          output.detach().reshape(-1))
            total += jacobian.T @ curvature @ jacobian
    return total / len(X)


# --------------------------------------------------------------------------- IHVP solvers


def ihvp_direct(H: Tensor, v: Tensor, damping: float) -> Tensor:
    """Solve ``(H + λI) x = v`` exactly (``torch.linalg.solve``).

    Args:
        H: ``[p, p]`` Hessian, undamped.
        v: ``[p]`` or ``[p, k]`` right-hand side(s).
        damping: λ >= 0, added to the diagonal.
    """
    _check_damping(damping)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if v.ndim not in (1, 2) or v.shape[0] != H.shape[0]:
        raise ValueError(f"v must be [{H.shape[0]}] or [{H.shape[0]}, k], got {tuple(v.shape)}")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve(H + damping * eye, v)


def lissa(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    v: Tensor,
    damping: float,
    scale: float = 10.0,
    depth: int = 100,
    batch_size: int = 32,
    repeats: int = 1,
    seed: int = 0,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """LiSSA (Agarwal et al. 2017) as used by Koh & Liang (2017): a stochastic estimate of
    ``H_λ^{-1} v`` with ``H_λ = H + λI``.

    The Neumann series ``A^{-1} = Σ_j (I - A)^j`` holds when the eigenvalues of ``A`` lie in
    ``(0, 2)``. With ``A = H_λ / scale`` it gives the recursion, started at ``h_0 = v``::

        h_j = v + (I - H_λ / scale) h_{j-1}
            = v + (1 - λ / scale) h_{j-1} - H_B h_{j-1} / scale

    whose fixed point is ``h = scale · H_λ^{-1} v``, so the estimate is ``h_depth / scale``.
    ``H_B`` is the Hessian of the mean loss on a fresh random minibatch of ``batch_size``
    training samples at every step (an HVP by double backward); the whole recursion is run
    ``repeats`` times with independent minibatches and the results are averaged.

    **Damping and scale are separate.** ``damping`` (λ) changes the matrix being inverted;
    ``scale`` only sets the step size of the series and does not change its limit. Some
    implementations write the update as ``(1 - damping) h`` and so mix the two: here the
    result converges to ``(H + λI)^{-1} v`` for any ``scale`` large enough for convergence,
    i.e. ``scale > λ_max(H_B + λI) / 2`` for every minibatch, and ``H_λ`` positive definite.

    The textbook settings (``depth=100``, ``batch_size=32``, one repeat) usually do not
    converge: on the paper CNN's head the project measured a relative error of 0.97 against the
    direct solve. Convergence needs roughly ``depth ≳ scale / λ_min(H_λ)`` steps and minibatch
    noise averaged out (large batches or many repeats).

    Args:
        v: ``[p]`` right-hand side.
        damping: λ >= 0.
        scale: > 0, see above.
        depth: number of recursion steps per repeat.
        batch_size: minibatch size for ``H_B``; ``>= n`` uses the full training set every step.
        repeats: independent runs averaged.
        seed: seeds the minibatch sampling (``torch.Generator``), so results are reproducible.

    Raises:
        RuntimeError: if the recursion diverges (non-finite estimate); increase ``scale``.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    _check_vector(v, _num_params(params), "v")
    _check_damping(damping)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    for name, value in (("depth", depth), ("batch_size", batch_size), ("repeats", repeats)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    loss_fn = loss_fn or _cross_entropy
    n = len(X)
    generator = torch.Generator().manual_seed(seed)
    v = v.detach()
    estimates = []
    with _prepared(model, params):
        for _ in range(repeats):
            h = v.clone()
            for _ in range(depth):
                batch = torch.randperm(n, generator=generator)[:batch_size].to(X.device)
                Hh = _double_backward_hvp(model, params, X[batch], y[batch], h, loss_fn)
                h = v + (1 - damping / scale) * h - Hh / scale
            if not torch.isfinite(h).all():
                raise RuntimeError(
                    f"LiSSA diverged (non-finite estimate) with scale={scale}: "
                    "increase scale above half the largest eigenvalue of H + damping*I"
                )
            estimates.append(h / scale)
    return torch.stack(estimates).mean(dim=0)


def ihvp(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    v: Tensor,
    damping: float,
    solver: str = "direct",
    loss_fn: LossFn | None = None,
    **lissa_kwargs: float,
) -> Tensor:
    """``H_λ^{-1} v`` with ``H`` the Hessian of the mean loss over the training set ``(X, y)``.

    ``solver="direct"`` builds :func:`hessian` and calls :func:`ihvp_direct` (``v`` may be
    ``[p]`` or ``[p, k]``); ``solver="lissa"`` calls :func:`lissa` with ``lissa_kwargs`` (one
    column at a time for a ``[p, k]`` right-hand side).
    """
    if solver == "direct":
        if lissa_kwargs:
            raise ValueError(f"options {sorted(lissa_kwargs)} only apply to solver='lissa'")
        return ihvp_direct(hessian(model, params, X, y, loss_fn), v, damping)
    if solver == "lissa":
        columns = v.unsqueeze(1) if v.ndim == 1 else v
        solved = [
            lissa(model, params, X, y, col, damping, loss_fn=loss_fn, **lissa_kwargs)
            for col in columns.T
        ]
        return torch.stack(solved, dim=1).reshape(v.shape)
    raise ValueError(f"unknown solver {solver!r}: use 'direct' or 'lissa'")


# --------------------------------------------------------------------------- influence


def _grads_by(
    per_sample: str,
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None,
) -> Tensor:
    if per_sample == "loop":
        return per_sample_grads(model, params, X, y, loss_fn)
    if per_sample == "vmap":
        return per_sample_grads_vmap(model, params, X, y, loss_fn)
    raise ValueError(f"unknown per_sample {per_sample!r}: use 'loop' or 'vmap'")


def scores_from_ihvp(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    s: Tensor,
    loss_fn: LossFn | None = None,
    per_sample: str = "loop",
) -> Tensor:
    """Group influence of each sample of ``(X, y)`` given ``s = H_λ^{-1} ∇L(D_val)``:
    ``I(z_i) = -sᵀ ∇_θ l(z_i)``, from explicit per-sample gradients (``"loop"`` or ``"vmap"``).

    Returns:
        ``[n]``; positive = harmful.
    """
    _check_vector(s, _num_params(_check_params(model, params)), "s")
    G = _grads_by(per_sample, model, params, X, y, loss_fn)
    return -(G @ s.to(G.dtype))


def influence_scores(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    damping: float,
    solver: str = "direct",
    per_sample: str = "loop",
    loss_fn: LossFn | None = None,
    **lissa_kwargs: float,
) -> Tensor:
    """Group influence (Koh & Liang Eq. 7) of every training sample on the validation loss:
    ``I(z) = -∇L(D_val)ᵀ H_λ^{-1} ∇l(z)``, no ``1/n`` factor.

    Steps: ``g = ∇L(D_val)`` (:func:`mean_loss_grad`), ``s = H_λ^{-1} g`` (:func:`ihvp` with
    ``solver`` and ``lissa_kwargs``), then :func:`scores_from_ihvp` with ``per_sample``.

    Returns:
        ``[n_train]``; positive = up-weighting the sample raises the validation loss (harmful).
        Removing sample ``z`` changes the validation loss by about ``-I(z) / n_train``.
    """
    X_train, y_train = _check_pair(train, "train")
    X_val, y_val = _check_pair(val, "val")
    _check_damping(damping)
    g_val = mean_loss_grad(model, params, X_val, y_val, loss_fn)
    s = ihvp(model, params, X_train, y_train, g_val, damping, solver, loss_fn, **lissa_kwargs)
    return scores_from_ihvp(model, params, X_train, y_train, s, loss_fn, per_sample)


def pairwise_influence(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    damping: float,
    solver: str = "direct",
    per_sample: str = "loop",
    loss_fn: LossFn | None = None,
    **lissa_kwargs: float,
) -> Tensor:
    """Pairwise influence (Eq. 3) ``I(z_train, z_test) = -∇l(z_test)ᵀ H_λ^{-1} ∇l(z_train)``.

    ``H`` is the Hessian of the mean loss over ``train``.

    Returns:
        ``[n_train, n_test]``; column ``j`` averaged over ``j`` equals :func:`influence_scores`
        with ``test`` as the validation set.
    """
    X_train, y_train = _check_pair(train, "train")
    X_test, y_test = _check_pair(test, "test")
    _check_damping(damping)
    G_train = _grads_by(per_sample, model, params, X_train, y_train, loss_fn)
    G_test = _grads_by(per_sample, model, params, X_test, y_test, loss_fn)
    S = ihvp(model, params, X_train, y_train, G_test.T, damping, solver, loss_fn, **lissa_kwargs)
    return -(G_train @ S)


def self_influence(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    train: tuple[Tensor, Tensor],
    damping: float,
    data: tuple[Tensor, Tensor] | None = None,
    solver: str = "direct",
    per_sample: str = "loop",
    loss_fn: LossFn | None = None,
    **lissa_kwargs: float,
) -> Tensor:
    """Self-influence ``∇l(z)ᵀ H_λ^{-1} ∇l(z)`` of every sample of ``data`` (default: ``train``),
    with ``H`` the Hessian of the mean loss over ``train``.

    Returns:
        ``[n]``; non-negative when ``H_λ`` is positive definite.
    """
    X_train, y_train = _check_pair(train, "train")
    X, y = (X_train, y_train) if data is None else _check_pair(data, "data")
    _check_damping(damping)
    G = _grads_by(per_sample, model, params, X, y, loss_fn)
    S = ihvp(model, params, X_train, y_train, G.T, damping, solver, loss_fn, **lissa_kwargs)
    return (G * S.T).sum(dim=1)


def perturbation_influence(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    X: Tensor,
    y: Tensor,
    s: Tensor,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Perturbation influence (Koh & Liang Eq. 8) ``I_pert(z_i) = -∇_x (sᵀ ∇_θ l(z_i))``.

    ``s = H_λ^{-1} ∇L(D_val)`` is given (e.g. from :func:`ihvp`). For each sample, in a loop:
    the gradient w.r.t. θ with ``create_graph=True``, its dot product with ``s``, and the
    gradient of that scalar w.r.t. the input ``x_i``. Moving ``x_i`` by ``-ε I_pert`` lowers
    (to first order) the validation loss the model would reach after up-weighting ``z_i``.

    Returns:
        A tensor shaped like ``X``.
    """
    params = _check_params(model, params)
    _check_data(X, y)
    if not X.is_floating_point():
        raise ValueError(f"X must be floating point to differentiate w.r.t. it, got {X.dtype}")
    _check_vector(s, _num_params(params), "s")
    loss_fn = loss_fn or _cross_entropy
    s_parts = _unflatten(s.detach(), params)
    out = torch.zeros_like(X)
    with _prepared(model, params):
        for i in range(len(X)):
            x = X[i : i + 1].detach().requires_grad_(True)
            loss = _losses(model, x, y[i : i + 1], loss_fn).sum()
            grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
            s_dot_grad = _dot(grads, s_parts)
            (grad_x,) = torch.autograd.grad(s_dot_grad, x, materialize_grads=True)
            out[i] = -grad_x[0]
    return out
