"""Attention: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` (batch first, no
masks), the ``[0]`` of a module's tuple of outputs and indexing that keeps the
batch whole (``x[:, 0]``, a ViT's class token), and a ViT's class token and position
embeddings (:class:`ClassTokenAndPositions`)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from fastinfluence.layers.registry import (
    NotCovered,
    Options,
    Rule,
    Site,
    add_tangents,
    register_layer,
)

ATTENTION_KFAC = ("its query/key/value projection is one bare weight that the module reads "
                  "directly (no Linear forward to hook): leave it out of params")


class ClassTokenAndPositions(nn.Module):
    """A learned class token put before ``N`` tokens ``[B, N, E]`` and learned position
    embeddings added: ``y = [c; x_1; …; x_N] + P``, ``c`` ``[1, 1, E]``, ``P`` ``[1, N+1, E]``.

    One module (traced as one node, :func:`fastinfluence.layers.tracing.trace`) so that the
    fused tangent pass reads both parameters by name; both are drawn from ``N(0, 0.02²)``.
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.class_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, num_tokens + 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1) + self.position


@register_layer(ClassTokenAndPositions,
                kfac=NotCovered("a class token and position embeddings are added, not a "
                                "product: no Kronecker-factored block (leave them out of "
                                "params)"))
class ClassTokenAndPositionsRule(Rule):
    """``y = [c; x] + P``: ``dy = [dc; dx] + dP`` (``dc``, ``dP`` shared by the batch)."""

    kind = "class_token"
    reads = ("class_token", "position")

    def configure(self, site: Site) -> Options | str:
        dim = site.module.class_token.shape[-1]
        wanted = (site.module.position.shape[1] - 1, dim)
        if len(site.input_shape) != 3 or site.input_shape[1:] != wanted:
            return (f"{site.name}: ClassTokenAndPositions for {list(wanted)} tokens on an "
                    f"input of shape {list(site.input_shape)}")
        return {}

    def run(self, step, at, x, dx):
        k, batch = at.k, len(x)
        token, position = step.tensor(at, "class_token"), step.tensor(at, "position")
        y = torch.cat([token.expand(batch, -1, -1), x], dim=1) + position
        dtoken, dposition = step.tangent(at, "class_token"), step.tangent(at, "position")
        dy = None
        if dx is not None or dtoken is not None:
            first = (x.new_zeros(k, batch, 1, x.shape[-1]) if dtoken is None
                     else dtoken.expand(k, batch, 1, x.shape[-1]))
            rest = x.new_zeros(k, *x.shape) if dx is None else dx.view(k, *x.shape)
            dy = torch.cat([first, rest], dim=2)
        if dposition is not None:
            dy = (dposition.expand(k, *y.shape) if dy is None else dy + dposition)
        return y, None if dy is None else dy.reshape(k * batch, *y.shape[1:])


def attention_tangent(
    q: torch.Tensor, key: torch.Tensor, v: torch.Tensor, dq: torch.Tensor | None,
    dkey: torch.Tensor | None, dv: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``O = A V``, ``A = softmax(s·Q Kᵀ)`` over the last axis, and its tangent
    ``dO = dA V + A dV``, ``dA = A ⊙ (dS − rowsum(A ⊙ dS))``, ``dS = s(dQ Kᵀ + Q dKᵀ)``.

    ``q`` ``[B, ..., L, E]``, ``key`` ``[B, ..., S, E]``, ``v`` ``[B, ..., S, F]``; tangents
    ``[k, *shape]`` or ``None`` (zero); returns ``O`` and ``dO`` ``[k, B, ..., L, F]``.
    The ``[L, S]``-sized work is kept to the products: ``s`` scales ``Q`` and ``dQ``, and
    ``dA V = P V − rowsum(P) ⊙ O`` with ``P = A ⊙ dS``.
    """
    q = q * scale
    weights = torch.softmax(q @ key.transpose(-2, -1), dim=-1)
    out = weights @ v
    dscores = None
    if dq is not None:
        dscores = (dq * scale) @ key.transpose(-2, -1)
    if dkey is not None:
        dscores = add_tangents(dscores, q @ dkey.transpose(-2, -1))
    dout = None
    if dscores is not None:
        moved = weights * dscores
        dout = moved @ v - moved.sum(-1, keepdim=True) * out
    if dv is not None:
        dout = add_tangents(dout, weights @ dv)
    return out, dout


def _stacked(dx: torch.Tensor | None, x: torch.Tensor, k: int) -> torch.Tensor | None:
    """A tangent ``[k·B, ...]`` as ``[k, B, ...]``."""
    return None if dx is None else dx.view(k, *x.shape)


@register_layer(F.scaled_dot_product_attention)
class ScaledDotProductAttention(Rule):
    """``softmax(s·Q Kᵀ) V`` without mask, dropout or causal masking (see
    :func:`attention_tangent`), ``s = 1/√E`` unless ``scale=`` is given."""

    kind = "attention"
    arity = 3

    def configure(self, site: Site) -> Options | str:
        values = site.arguments(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))
        if values is None:
            return f"{site.name}: scaled_dot_product_attention with unknown arguments"
        if (values.get("attn_mask") is not None or values.get("dropout_p", 0.0) != 0.0
                or values.get("is_causal", False) or values.get("enable_gqa", False)):
            return (f"{site.name}: scaled_dot_product_attention with a mask, dropout, causal "
                    f"masking or grouped queries is not supported")
        q, key, v = site.inputs
        if (len(q) < 3 or len(key) != len(q) or len(v) != len(q) or q[:-2] != key[:-2]
                or key[:-1] != v[:-1] or q[-1] != key[-1]):
            return (f"{site.name}: scaled_dot_product_attention of shapes {list(q)}, "
                    f"{list(key)}, {list(v)} (broadcasting) is not supported")
        scale = values.get("scale")
        return {"scale": 1 / math.sqrt(q[-1]) if scale is None else float(scale)}

    def run(self, step, at, q, dq, key, dkey, v, dv):
        k = at.k
        out, dout = attention_tangent(q, key, v, _stacked(dq, q, k), _stacked(dkey, key, k),
                                      _stacked(dv, v, k), step.options["scale"])
        return out, None if dout is None else dout.reshape(k * len(q), *out.shape[1:])


def _linear_tangent(
    x: torch.Tensor, dx: torch.Tensor | None, weight: torch.Tensor,
    dweight: torch.Tensor | None, dbias: torch.Tensor | None,
) -> torch.Tensor | None:
    """The tangent ``[k, B, ..., out]`` of ``x Wᵀ + b``: ``dx Wᵀ + x dWᵀ + db`` (``dx``
    ``[k, B, ..., in]``, ``dW`` ``[k, out, in]``, ``db`` ``[k, out]``; ``None`` = zero), or
    ``None`` when all three are."""
    dy = None if dx is None else F.linear(dx, weight)
    k = None if dx is None else len(dx)
    if dweight is not None:  # one product with k·out outputs for all directions
        k = len(dweight)
        term = F.linear(x, dweight.reshape(-1, dweight.shape[-1])).unflatten(-1, (k, -1))
        dy = add_tangents(dy, term.movedim(-2, 0))
    if dbias is not None:
        k = len(dbias)
        term = dbias.view(k, *(1,) * (x.ndim - 1), -1)
        dy = term if dy is None else dy + term
    return None if dy is None else dy.expand(k, *x.shape[:-1], weight.shape[0])


@register_layer(nn.MultiheadAttention, kfac=NotCovered(ATTENTION_KFAC))
class MultiheadAttention(Rule):
    """``nn.MultiheadAttention(batch_first=True)`` without masks: the input projections
    ``Q = q W_qᵀ + b_q``, ``K = k W_kᵀ + b_k``, ``V = v W_vᵀ + b_v`` (the rows of
    ``in_proj_weight``; one product for self-attention) split into heads,
    :func:`attention_tangent` per head, the heads joined and ``out_proj`` applied. Its output
    is the tuple ``(attention output, None)``: only ``[0]`` may be read."""

    kind = "multihead_attention"
    arity = 3
    reads = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")

    def configure(self, site: Site) -> Options | str:
        module, node = site.module, site.node
        if not module.batch_first:
            return f"{site.name}: MultiheadAttention(batch_first=False) is not supported"
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return (f"{site.name}: MultiheadAttention with kdim/vdim, add_bias_kv or "
                    f"add_zero_attn is not supported")
        values = site.arguments(("key_padding_mask", "need_weights", "attn_mask",
                                 "average_attn_weights", "is_causal"))
        if values is None:
            return f"{site.name}: MultiheadAttention with unknown arguments"
        if (values.get("key_padding_mask") is not None or values.get("attn_mask") is not None
                or values.get("is_causal", False)):
            return f"{site.name}: MultiheadAttention with a mask is not supported"
        if any(user.target is not operator.getitem or user.args[1] != 0
               for user in node.users):
            return (f"{site.name}: the attention weights of MultiheadAttention are read "
                    f"(only its output [0] is supported)")
        query, key, value = site.inputs
        if (any(len(shape) != 3 or shape[-1] != module.embed_dim for shape in site.inputs)
                or query[0] != key[0] or key[:2] != value[:2]):
            return (f"{site.name}: MultiheadAttention of width {module.embed_dim} on inputs "
                    f"of shapes {list(query)}, {list(key)}, {list(value)}")
        return {"heads": module.num_heads}

    def run(self, step, at, query, dquery, key, dkey, value, dvalue):
        k, heads = at.k, step.options["heads"]
        batch, length, dim = query.shape
        weight, bias = step.tensor(at, "in_proj_weight"), step.tensor(at, "in_proj_bias")
        dweight, dbias = step.tangent(at, "in_proj_weight"), step.tangent(at, "in_proj_bias")

        def project(x: torch.Tensor, dx: torch.Tensor | None,
                    rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            """``x`` through the rows ``rows`` of the input projection, and its tangent."""
            part = weight[rows]
            return (F.linear(x, part, None if bias is None else bias[rows]),
                    _linear_tangent(x, _stacked(dx, x, k), part,
                                    None if dweight is None else dweight[:, rows],
                                    None if dbias is None else dbias[:, rows]))

        def heads_of(t: torch.Tensor | None) -> torch.Tensor | None:
            """``[..., L, E]`` as ``[..., H, L, E/H]``."""
            return None if t is None else t.unflatten(-1, (heads, dim // heads)).transpose(-3, -2)

        if query is key and key is value:  # self-attention: one product for Q, K and V
            projected, dprojected = project(query, dquery, slice(None))
            primals = projected.chunk(3, dim=-1)
            tangents = [None] * 3 if dprojected is None else dprojected.chunk(3, dim=-1)
        else:
            parts = [project(x, dx, slice(i * dim, (i + 1) * dim)) for i, (x, dx)
                     in enumerate(((query, dquery), (key, dkey), (value, dvalue)))]
            primals, tangents = zip(*parts, strict=True)
        out, dout = attention_tangent(*map(heads_of, primals), *map(heads_of, tangents),
                                      1 / math.sqrt(dim // heads))
        joined = out.transpose(-3, -2).flatten(-2)
        out_weight = step.tensor(at, "out_proj.weight")
        y = F.linear(joined, out_weight, step.tensor(at, "out_proj.bias"))
        dy = _linear_tangent(joined, None if dout is None else dout.transpose(-3, -2).flatten(-2),
                             out_weight, step.tangent(at, "out_proj.weight"),
                             step.tangent(at, "out_proj.bias"))
        if dy is not None:
            dy = dy.reshape(k * batch, length, dim)
        return (y, None), None if dy is None else (dy, None)


@register_layer(operator.getitem)
class GetItem(Rule):
    """``value[i]`` of a module's tuple of outputs (``MultiheadAttention(...)[0]``), or
    ``x[:, ...]`` of a tensor by integers and slices that keep the batch whole (a ViT's class
    token ``x[:, 0]``): the same index of primal and tangent."""

    kind = "getitem"

    def configure(self, site: Site) -> Options | str:
        index = site.node.args[1] if len(site.node.args) == 2 else None
        if site.input_shape == ():  # not a tensor: a tuple of outputs
            if isinstance(index, int):
                return {"index": index}
            return f"{site.name}: indexing a tuple of outputs by {index!r}"
        if (isinstance(index, tuple) and index and index[0] == slice(None)
                and all(isinstance(i, int | slice) for i in index[1:])):
            return {"index": index}
        return (f"{site.name}: indexing by {index!r} (only x[:, ...] with integers and slices, "
                f"which keeps the batch whole, is supported)")

    def run(self, step, at, x, dx):
        index = step.options["index"]
        return x[index], None if dx is None else dx[index]
