"""Attention: softmax and scaled dot-product attention (queries and keys contract over
their head_dim, keys and values share their positions)."""

from __future__ import annotations

from typing import Any

from torch import fx

from converters.dims import Var
from converters.rules.base import (
    Context,
    default_rule,
    norm_dim,
    register_rule,
)


@register_rule(
    "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten._safe_softmax"
)
def _softmax(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    ctx.mark([dx[norm_dim(node.args[1], len(dx))]], "other")
    return dx


@register_rule(
    "aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu"
)
def _sdpa(ctx: Context, node: fx.Node) -> Any:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dq, dk, dv = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    where = f"in {ctx.module_of(node)}"
    if node.kwargs.get("enable_gqa") and sq[-3] != sk[-3]:
        return default_rule(ctx, node, "aten.scaled_dot_product_attention (enable_gqa)")
    alg = ctx.alg
    alg.unify(dq[-1], dk[-1], where)
    alg.unify(dk[-2], dv[-2], where)
    n = len(dq) - 2
    batch: list[Var | None] = []
    for i in range(n):
        vs = [d[i] for d, s in ((dq, sq), (dk, sk), (dv, sv)) if len(d) > i and s[i] != 1]
        u = None
        for x in vs:
            u = alg.unify(u, x, where)
        batch.append(u)
    if isinstance(mask, fx.Node):
        dm, sm = ctx.dims(mask), ctx.shape(mask)
        full = batch + [dq[-2], dk[-2]]
        off = len(full) - len(dm)
        for i, (m, s) in enumerate(zip(dm, sm)):
            if s != 1:
                full[off + i] = alg.unify(full[off + i], m, where)
    ctx.mark([dk[-2]], "other")
    out = batch + [dq[-2], dv[-1]]
    if isinstance(node.meta.get("val"), list | tuple):
        return [out] + [None] * (len(node.meta["val"]) - 1)
    return out
