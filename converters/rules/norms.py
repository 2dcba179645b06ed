"""Normalizations: BatchNorm/InstanceNorm, LayerNorm/RMSNorm, GroupNorm. Their affine
parameters and running statistics sit on the neuron set they normalize."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from converters.dims import StructureConflict
from converters.rules.base import (
    Context,
    op_name,
    register_rule,
)


@register_rule(
    "aten.batch_norm",
    "aten._native_batch_norm_legit_no_training",
    "aten._native_batch_norm_legit",
    "aten.native_batch_norm",
    "aten._native_batch_norm_legit_functional",
    "aten.instance_norm",
)
def _batch_norm(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx = list(ctx.dims(x))
    c = dx[1] if len(dx) > 1 else dx[0]
    roles = ("norm_weight", "norm_bias", "running_mean", "running_var")
    for a, role in zip(node.args[1:5], roles):
        if isinstance(a, fx.Node):
            c = ctx.alg.unify(c, ctx.dims(a)[0], f"in {ctx.module_of(node)}")
            ctx.on_set(node, x, a, c, role)
    if op_name(node.target) == "aten.instance_norm":
        ctx.mark([c], "other")
    out = dx
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        return [out] + [
            [c] if isinstance(v, torch.Tensor) and v.dim() == 1 else None for v in val[1:]
        ]
    return out


@register_rule("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten._fused_rms_norm")
def _layer_norm(ctx: Context, node: fx.Node) -> Any:
    x, normalized = node.args[0], node.args[1]
    dx = list(ctx.dims(x))
    k = len(normalized)
    for a, role in zip(node.args[2:4], ("norm_weight", "norm_bias")):
        if isinstance(a, fx.Node):
            for v, u in zip(dx[-k:], ctx.dims(a)):
                ctx.alg.unify(v, u, f"in {ctx.module_of(node)}")
            if k == 1:
                ctx.on_set(node, x, a, dx[-1], role)
    ctx.mark(dx[-k:], "other")
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        stats = dx[:-k] + [None] * k
        return [dx] + [stats for _ in val[1:]]
    return dx


@register_rule("aten.group_norm", "aten.native_group_norm")
def _group_norm(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx = list(ctx.dims(x))
    sx = ctx.shape(x)
    if op_name(node.target) == "aten.group_norm":
        groups, w, b = (
            node.args[1],
            node.args[2] if len(node.args) > 2 else None,
            node.args[3] if len(node.args) > 3 else None,
        )
    else:
        w, b, groups = node.args[1], node.args[2], node.args[6]
    try:
        ctx.alg.factorize(dx[1], [groups, sx[1] // groups])
    except StructureConflict:
        ctx.alg.conflict(f"channels ({sx[1]}) do not split into {groups} norm groups", dx[1])
    for a, role in ((w, "norm_weight"), (b, "norm_bias")):
        if isinstance(a, fx.Node):
            ctx.alg.unify(dx[1], ctx.dims(a)[0], f"in {ctx.module_of(node)}")
            ctx.on_set(node, x, a, dx[1], role)
    ctx.mark([dx[1]], "other")
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        return [dx, [dx[0], None], [dx[0], None]]
    return dx
