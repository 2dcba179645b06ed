"""Linear maps: Linear/addmm/matmul/einsum, convolutions (grouped and transposed),
embeddings. These create channel spaces and record the weights as edges."""

from __future__ import annotations

from typing import Any

from torch import fx

from converters.dims import StructureConflict, Var, find
from converters.rules.base import (
    Context,
    default_rule,
    op_name,
    register_rule,
)


@register_rule("aten.linear")
def _linear(ctx: Context, node: fx.Node) -> Any:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    dx, dw = ctx.dims(x), ctx.dims(w)
    where = f"in {ctx.module_of(node)}"
    if len(dw) == 1:  # linear with a vector weight: a dot product
        ctx.alg.unify(dx[-1], dw[0], where)
        return list(dx[:-1])
    ctx.alg.unify(dx[-1], dw[1], where)
    ctx.edge(node, x, w, 0, 1, dw[1], dw[0])
    if isinstance(b, fx.Node):
        ctx.alg.unify(ctx.dims(b)[0], dw[0], where)
        ctx.on_set(node, None, b, dw[0], "bias")
    return list(dx[:-1]) + [dw[0]]


@register_rule("aten.addmm")
def _addmm(ctx: Context, node: fx.Node) -> Any:
    bias, a, b = node.args[:3]
    out = _matmul_dims(ctx, node, a, b)
    db = ctx.dims(bias)
    if db:
        ctx.alg.unify(db[-1], out[-1])
    if len(ctx.dims(b)) == 2:  # x @ W + bias with W stored (in, out), e.g. HF Conv1D
        ctx.edge(node, a, b, 1, 0, ctx.dims(b)[0], ctx.dims(b)[1])
        if len(db) == 1:
            ctx.on_set(node, None, bias, out[-1], "bias")
    return out


def _matmul_dims(ctx: Context, node: fx.Node, a: fx.Node, b: fx.Node) -> list[Var | None]:
    da, db = list(ctx.dims(a)), list(ctx.dims(b))
    sa, sb = ctx.shape(a), ctx.shape(b)
    where = f"in {ctx.module_of(node)}"
    if len(da) == 1 and len(db) == 1:
        ctx.alg.unify(da[0], db[0], where)
        return []
    if len(db) == 1:
        ctx.alg.unify(da[-1], db[0], where)
        return da[:-1]
    if len(da) == 1:
        ctx.alg.unify(da[0], db[-2], where)
        return db[:-2] + [db[-1]]
    ctx.alg.unify(da[-1], db[-2], where)
    batch_a, batch_b = da[:-2], db[:-2]
    shp_a, shp_b = sa[:-2], sb[:-2]
    n = max(len(batch_a), len(batch_b))
    out_batch: list[Var | None] = []
    for i in range(n):
        ia, ib = i - (n - len(batch_a)), i - (n - len(batch_b))
        va = batch_a[ia] if ia >= 0 and shp_a[ia] != 1 else None
        vb = batch_b[ib] if ib >= 0 and shp_b[ib] != 1 else None
        out_batch.append(ctx.alg.unify(va, vb, where))
    return out_batch + [da[-2], db[-1]]


@register_rule("aten.matmul", "aten.mm", "aten.bmm")
def _matmul(ctx: Context, node: fx.Node) -> Any:
    return _matmul_dims(ctx, node, node.args[0], node.args[1])


@register_rule("aten.einsum")
def _einsum(ctx: Context, node: fx.Node) -> Any:
    eq, operands = node.args[0], node.args[1]
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    if "." in eq:
        return default_rule(ctx, node, "aten.einsum (with ellipsis)")
    letters: dict[str, Var | None] = {}
    for spec, op in zip(lhs.split(","), operands):
        d, shp = ctx.dims(op), ctx.shape(op)
        for ch, v, n in zip(spec, d, shp):
            if n == 1:
                continue
            letters[ch] = ctx.alg.unify(letters.get(ch), v, f"in {ctx.module_of(node)}")
    return [letters.get(ch) for ch in rhs]


def _conv(ctx: Context, node: fx.Node, transposed: bool, groups: int) -> Any:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    dx, dw = ctx.dims(x), ctx.dims(w)
    sx, sw = ctx.shape(x), ctx.shape(w)
    where = f"in {ctx.module_of(node)}"
    out_shape = ctx.out_shape(node)
    batched = len(sx) == len(sw)
    cin_axis = 1 if batched else 0
    for v in dw[2:]:
        ctx.alg.fix(v)  # kernel taps
    in_w, out_w = (0, 1) if transposed else (1, 0)
    if groups == 1:
        ctx.alg.unify(dx[cin_axis], dw[in_w], where)
        out_c = dw[out_w]
    else:
        cin = sx[cin_axis]
        try:
            g_in, x_in = ctx.alg.factorize(dx[cin_axis], [groups, cin // groups])
            if transposed:
                g_w, w_in = ctx.alg.factorize(dw[0], [groups, sw[0] // groups])
                ctx.alg.unify(g_in, g_w, where)
                ctx.alg.unify(x_in, w_in, where)
                # per-group output channels live on axis 1, the group on axis 0
                out_c = ctx.alg.prod([g_in, dw[1]])
            else:
                g_out, _ = ctx.alg.factorize(dw[0], [groups, sw[0] // groups])
                ctx.alg.unify(g_in, g_out, where)
                ctx.alg.unify(x_in, dw[1], where)
                out_c = dw[0]
        except StructureConflict:
            out_c = _grouped_conflict(ctx, dx[cin_axis], dw, sw, groups, transposed)
    if groups == 1:
        ctx.edge(node, x, w, out_w, in_w, dw[in_w], out_c)
    else:  # block-diagonal: the kernel's input axis holds one group's channels only
        ctx.edge(node, x, w, out_w, None, None, out_c)
    if isinstance(b, fx.Node):
        ctx.alg.unify(ctx.dims(b)[0], out_c, where)
        ctx.on_set(node, None, b, out_c, "bias")
    spatial = [ctx.alg.fixed(n) for n in out_shape[cin_axis + 1 :]]
    return ([dx[0]] if batched else []) + [out_c] + spatial


def _grouped_conflict(
    ctx: Context, x_c: Var | None, dw: list, sw: tuple, groups: int, transposed: bool
) -> Var | None:
    """The input channels of a grouped conv do not split into ``groups`` blocks (a channel
    shuffle whose ``c/g`` is not a multiple of ``g``, say): its input side and the order of
    its groups are fixed, but the channels within every output group still permute (one
    permutation shared by all groups, the kernel rows following), so only the input's
    dims and the group order are lost. Returns the output channel variable."""
    alg = ctx.alg
    w_in, w_out = (0, 1) if transposed else (1, 0)
    alg.fix(dw[w_in])  # the kernel's own input axis: a fresh variable, nothing to lose
    size = find(x_c).size if x_c is not None else 1
    what = f"input channels ({size}) do not split into the {groups} groups of the convolution"
    if transposed:  # per-group output channels on axis 1, the group on axis 0
        alg.conflict(what, x_c)
        return alg.prod([alg.fixed(groups), dw[1]])
    try:
        g_out, _ = alg.factorize(dw[w_out], [groups, sw[w_out] // groups])
    except StructureConflict:
        alg.conflict(what + "; nor do its output channels", x_c, dw[w_out])
        return dw[w_out]
    alg.conflict(what + "; the group order is fixed", x_c, g_out)
    return dw[w_out]


@register_rule("aten.conv1d", "aten.conv2d", "aten.conv3d")
def _conv_nd(ctx: Context, node: fx.Node) -> Any:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return _conv(ctx, node, False, groups)


@register_rule("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d")
def _conv_t(ctx: Context, node: fx.Node) -> Any:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return _conv(ctx, node, True, groups)


@register_rule("aten.convolution", "aten._convolution")
def _convolution(ctx: Context, node: fx.Node) -> Any:
    return _conv(ctx, node, bool(node.args[6]), node.args[8])


@register_rule("aten.embedding")
def _embedding(ctx: Context, node: fx.Node) -> Any:
    w, idx = node.args[0], node.args[1]
    dw = ctx.dims(w)
    ctx.alg.fix(dw[0])  # rows are addressed by token id
    ctx.edge(node, None, w, 1, 0, dw[0], dw[1])
    return list(ctx.dims(idx)) + [dw[1]]


@register_rule("aten.baddbmm", "aten.addbmm")
def _baddbmm(ctx: Context, node: fx.Node) -> Any:
    """``beta * input + alpha * (batch1 @ batch2)``."""
    bias, a, b = node.args[:3]
    out = _matmul_dims(ctx, node, a, b)
    if op_name(node.target) == "aten.addbmm":
        out = out[1:]
    db, sb = ctx.dims(bias), ctx.shape(bias)
    off = len(out) - len(db)
    for i, (v, n) in enumerate(zip(db, sb)):
        if n != 1 and off + i >= 0:
            out[off + i] = ctx.alg.unify(out[off + i], v, f"in {ctx.module_of(node)}")
    return out
