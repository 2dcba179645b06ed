"""Reductions and pooling: sums/means end an axis, arg-reductions fix it, spatial pools
and resampling act on the trailing spatial axes."""

from __future__ import annotations

import re
from typing import Any

from torch import fx

from converters.rules.base import (
    Context,
    default_rule,
    norm_dim,
    op_name,
    register_rule,
)


@register_rule(
    "aten.sum",
    "aten.mean",
    "aten.amax",
    "aten.amin",
    "aten.var",
    "aten.std",
    "aten.var_mean",
    "aten.logsumexp",
    "aten.prod",
    "aten.all",
    "aten.any",
    "aten.linalg_vector_norm",
    "aten.norm",
    "aten.nansum",
    "aten.count_nonzero",
)
def _reduce(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx = list(ctx.dims(x) or [])
    n = len(dx)
    name = op_name(node.target)
    dim_arg = None
    if name == "aten.linalg_vector_norm":
        dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        keep = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    elif name == "aten.norm":
        dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        keep = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    else:
        dim_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = (
            node.args[2]
            if len(node.args) > 2 and isinstance(node.args[2], bool)
            else node.kwargs.get("keepdim", False)
        )
        if name in ("aten.var", "aten.std", "aten.var_mean"):
            keep = node.kwargs.get("keepdim", keep)
    if isinstance(dim_arg, int):
        dim_arg = [dim_arg]
    if not dim_arg:
        dims = set(range(n))
    else:
        dims = {norm_dim(d, n) for d in dim_arg}
    if name not in ("aten.sum", "aten.mean", "aten.nansum"):
        ctx.mark([dx[i] for i in dims], "other")
    out = (
        [None if i in dims else v for i, v in enumerate(dx)]
        if keep
        else [v for i, v in enumerate(dx) if i not in dims]
    )
    if name == "aten.var_mean":
        return [out, out]
    if len(out) != len(ctx.out_shape(node)):
        return default_rule(ctx, node, name)
    return out


@register_rule(
    "aten.max",
    "aten.min",
    "aten.argmax",
    "aten.argmin",
    "aten.sort",
    "aten.topk",
    "aten.argsort",
    "aten.kthvalue",
    "aten.median",
    "aten.mode",
)
def _arg_reduce(ctx: Context, node: fx.Node) -> Any:
    """Ops returning indices along an axis: that axis becomes fixed."""
    x = node.args[0]
    dx = list(ctx.dims(x) or [])
    name = op_name(node.target)
    if len(node.args) == 1 and name in ("aten.max", "aten.min"):
        return []  # global max: a scalar, invariant
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if name in ("aten.topk", "aten.kthvalue"):  # (self, k, dim)
        d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    if not isinstance(d, int):
        return default_rule(ctx, node, name)
    d = norm_dim(d, len(dx))
    ctx.alg.fix(dx[d])
    ctx.mark(dx, "other")
    val = node.meta.get("val")
    shp = ctx.out_shape(node) if not isinstance(val, list | tuple) else tuple(val[0].shape)
    out = [v if i != d else ctx.alg.fixed(1) for i, v in enumerate(dx)]
    if len(shp) != len(out):
        out = [v for i, v in enumerate(dx) if i != d]
    if len(shp) == len(dx) and shp[d] != 1:
        out = list(dx)
        out[d] = ctx.alg.fixed(shp[d])
    if isinstance(val, list | tuple):
        return [out, list(out)]
    return out


@register_rule(
    "aten.adaptive_avg_pool1d",
    "aten.adaptive_avg_pool2d",
    "aten.adaptive_avg_pool3d",
    "aten.avg_pool1d",
    "aten.avg_pool2d",
    "aten.avg_pool3d",
    "aten.max_pool1d",
    "aten.max_pool2d",
    "aten.max_pool3d",
    "aten.max_pool2d_with_indices",
    "aten.adaptive_max_pool2d",
    "aten.upsample_nearest2d",
    "aten.upsample_bilinear2d",
    "aten.upsample_nearest1d",
    "aten.upsample_linear1d",
    "aten.upsample_bicubic2d",
    "aten.pixel_shuffle",
    "aten.pixel_unshuffle",
    "aten._adaptive_avg_pool2d",
)
def _spatial(ctx: Context, node: fx.Node) -> Any:
    """Pooling/resampling over the trailing spatial axes; batch and channels pass through.

    An adaptive pool whose output size along a pooled axis equals its input size is the
    identity along that axis (each bin is one index: ``start = floor(i n / n) = i``), so
    the axis keeps its variable: a CRNN puts its channels there with
    ``x.permute(0, 3, 1, 2)`` and ``AdaptiveAvgPool2d((None, 1))``.
    """
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    name = op_name(node.target)
    val = node.meta.get("val")
    shp = tuple(val[0].shape) if isinstance(val, list | tuple) else ctx.out_shape(node)
    spatial = {"1": 1, "2": 2, "3": 3}.get(
        re.sub(r"\D", "", name)[-1:] if re.search(r"\d", name) else "", 2
    )
    if name in ("aten.pixel_shuffle", "aten.pixel_unshuffle"):
        ctx.fix_inputs(node)
        return ctx.fixed_like(node)
    lead = len(sx) - spatial
    adaptive = name.startswith(("aten.adaptive_", "aten._adaptive_"))
    out = dx[:lead]
    for v, n_in, n_out in zip(dx[lead:], sx[lead:], shp[lead:]):
        if adaptive and n_in == n_out:
            out.append(v)
            continue
        ctx.alg.fix(v)
        out.append(ctx.alg.fixed(n_out))
    if isinstance(val, list | tuple):
        return [out, list(out)]
    return out
