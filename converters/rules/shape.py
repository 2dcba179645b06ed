"""Shape ops: reshape/permute/transpose give axes factors, cat/split/select give them
segments, indexing and padding fix what they address, tuple indexing."""

from __future__ import annotations

from typing import Any

from torch import fx

from converters.dims import Algebra, StructureConflict, Var, find
from converters.rules.base import (
    Context,
    default_rule,
    norm_dim,
    op_name,
    register_rule,
)


@register_rule(
    "aten.view",
    "aten.reshape",
    "aten._unsafe_view",
    "aten.flatten",
    "aten.unflatten",
    "aten.view_as",
    "aten.reshape_as",
    "aten._reshape_alias",
)
def _reshape(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    so = ctx.out_shape(node)
    return reshape_dims(ctx, node, dx, sx, so)


def reshape_dims(ctx: Context, node: fx.Node, dx: list, sx: tuple, so: tuple) -> list:
    alg = ctx.alg
    ins = [(v, n) for v, n in zip(dx, sx) if n != 1]
    out_idx = [i for i, n in enumerate(so) if n != 1]
    outs = [so[i] for i in out_idx]
    result: list[Var | None] = [None] * len(so)
    i = j = 0
    try:
        while i < len(ins) or j < len(outs):
            gi, gj = [ins[i]], [outs[j]]
            pi, pj = ins[i][1], outs[j]
            i += 1
            j += 1
            while pi != pj:
                if pi < pj:
                    gi.append(ins[i])
                    pi *= ins[i][1]
                    i += 1
                else:
                    gj.append(outs[j])
                    pj *= outs[j]
                    j += 1
            merged = alg.prod([v if v is not None else alg.leaf(n) for v, n in gi])
            if len(gi) > 1 and all(v is None for v, _ in gi):
                merged = None
            pieces = alg.factorize(merged, gj) if len(gj) > 1 else [merged]
            for k, p in enumerate(pieces):
                result[out_idx[j - len(gj) + k]] = p
    except (StructureConflict, IndexError):
        alg.conflict(f"reshape {sx} -> {so} splits the structure of its axes", *dx)
        return [alg.fixed(n) for n in so]
    return result


@register_rule("aten.permute")
def _permute(ctx: Context, node: fx.Node) -> Any:
    dx = ctx.dims(node.args[0])
    return [dx[norm_dim(p, len(dx))] for p in node.args[1]]


@register_rule("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    a, b = (norm_dim(d, len(dx)) for d in node.args[1:3])
    dx[a], dx[b] = dx[b], dx[a]
    return dx


@register_rule("aten.t", "aten.numpy_T", "aten.mT")
def _t(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    if len(dx) >= 2:
        dx[-1], dx[-2] = dx[-2], dx[-1]
    return dx


@register_rule("aten.movedim")
def _movedim(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    src, dst = node.args[1], node.args[2]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = len(dx)
    order = [None] * n
    src = [norm_dim(s, n) for s in src]
    dst = [norm_dim(d, n) for d in dst]
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(n) if i not in src)
    return [dx[o if o is not None else next(rest)] for o in order]


@register_rule("aten.unsqueeze")
def _unsqueeze(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    d = norm_dim(node.args[1], len(dx) + 1)
    return dx[:d] + [None] + dx[d:]


@register_rule("aten.squeeze")
def _squeeze(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    if len(node.args) < 2:
        return [v for v, n in zip(dx, sx) if n != 1]
    dims = node.args[1] if isinstance(node.args[1], list | tuple) else [node.args[1]]
    drop = {norm_dim(d, len(dx)) for d in dims if sx[norm_dim(d, len(dx))] == 1}
    return [v for i, v in enumerate(dx) if i not in drop]


@register_rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def _expand(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    so = ctx.out_shape(node)
    off = len(so) - len(dx)
    out: list[Var | None] = [None] * off
    for v, n, m in zip(dx, sx, so[off:]):
        out.append(v if n == m else None)  # an expanded axis is constant along itself
    return out


@register_rule("aten.repeat")
def _repeat(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    reps = list(node.args[1])
    off = len(reps) - len(dx)
    out: list[Var | None] = [None] * off
    for v, n, r in zip(dx, sx, reps[off:]):
        if r == 1 or n == 1:
            out.append(v if r == 1 else None)
        else:
            out.append(ctx.alg.prod([ctx.alg.leaf(r), v]))  # tiles: identical copies
    return out


@register_rule("aten.repeat_interleave")
def _repeat_interleave(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(x, fx.Node) or not isinstance(reps, int) or dim is None:
        return default_rule(ctx, node, "aten.repeat_interleave")
    dx = list(ctx.dims(x))
    d = norm_dim(dim, len(dx))
    dx[d] = ctx.alg.prod([dx[d], ctx.alg.leaf(reps)])
    return dx


@register_rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(ctx: Context, node: fx.Node) -> Any:
    tensors = [t for t in node.args[0] if ctx.shape(t) is not None and ctx.shape(t) != (0,)]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    so = ctx.out_shape(node)
    d = norm_dim(dim, len(so))
    out: list[Var | None] = [None] * len(so)
    parts, sizes = [], []
    for t in tensors:
        dt, st = ctx.dims(t), ctx.shape(t)
        for i, (v, n) in enumerate(zip(dt, st)):
            if i == d:
                continue
            if n == so[i]:
                out[i] = ctx.alg.unify(out[i], v, f"in {ctx.module_of(node)}")
        parts.append(dt[d])
        sizes.append(st[d])
    out[d] = ctx.alg.concat(parts, sizes)
    return out


@register_rule("aten.stack")
def _stack(ctx: Context, node: fx.Node) -> Any:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    so = ctx.out_shape(node)
    d = norm_dim(dim, len(so))
    out: list[Var | None] = [None] * (len(so) - 1)
    for t in tensors:
        for i, v in enumerate(ctx.dims(t)):
            out[i] = ctx.alg.unify(out[i], v, f"in {ctx.module_of(node)}")
    return out[:d] + [ctx.alg.fixed(len(tensors))] + out[d:]


def _split_outputs(ctx: Context, node: fx.Node, dim: int, sizes: list[int]) -> Any:
    x = node.args[0]
    dx = list(ctx.dims(x))
    d = norm_dim(dim, len(dx))
    try:
        segs = ctx.alg.split(dx[d], sizes)
    except StructureConflict:
        ctx.alg.conflict(
            f"axis {d} of shape {tuple(ctx.shape(x))} does not split into {sizes}", dx[d]
        )
        segs = [ctx.alg.fixed(n) for n in sizes]
    outs = []
    for seg in segs:
        o = list(dx)
        o[d] = seg
        outs.append(o)
    return outs


@register_rule(
    "aten.split", "aten.split_with_sizes", "aten.split_copy", "aten.split_with_sizes_copy"
)
def _split(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    sx = ctx.shape(x)
    size = node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    n = sx[norm_dim(dim, len(sx))]
    if isinstance(size, int):
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(size)
    return _split_outputs(ctx, node, dim, sizes)


@register_rule("aten.chunk")
def _chunk(ctx: Context, node: fx.Node) -> Any:
    val = node.meta["val"]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    d = norm_dim(dim, val[0].dim())
    return _split_outputs(ctx, node, dim, [int(v.shape[d]) for v in val])


def _select_dims(ctx: Context, x: fx.Node, d: int, index: int) -> list[Var | None]:
    """Axes of ``x.select(d, index)``.

    If the selected axis is the leading factor F of a product F × R (a fused projection
    reshaped to ``(..., 3, heads, head_dim)``), the product becomes a concatenation of
    independent copies of R and the selection returns copy ``index`` (q, k and v each
    keep their own symmetry). Otherwise the selected axis is fixed.
    """
    alg = ctx.alg
    dx = list(ctx.dims(x))
    v = dx[d]
    rest = dx[:d] + dx[d + 1 :]
    if v is None:
        return rest
    f = find(v)
    whole = alg.lead_of.get(f.id)
    others = {leaf.id for u in rest for leaf in alg.leaves(u)}
    if whole is not None:
        p = find(whole)
        # the product must be the one this tensor was reshaped from: its other factors
        # are among the tensor's other axes
        if (
            p.kind == "prod"
            and find(p.children[0]) is f
            and all(leaf.id in others for c in p.children[1:] for leaf in alg.leaves(c))
            and alg.can_select_leading(p)
        ):
            alg.select_leading(p)
        if p.kind == "cat" and p.select_copies is not None:
            mapping = p.select_copies[index]
            if others & set(mapping) or {find(u).id for u in rest if u is not None} & set(mapping):
                return [_remap(alg, u, mapping) for u in rest]
    alg.fix(v)
    return rest


def _remap(alg: Algebra, v: Var | None, mapping: dict[int, Var]) -> Var | None:
    if v is None:
        return None
    r = find(v)
    if r.id in mapping:
        return mapping[r.id]
    if r.kind == "leaf":
        return r
    kids = [_remap(alg, c, mapping) for c in r.children]
    if all(k is find(c) for k, c in zip(kids, r.children)):
        return r
    return Var(r.size, r.kind, tuple(kids))


@register_rule("aten.select")
def _select(ctx: Context, node: fx.Node) -> Any:
    x, dim, index = node.args[0], node.args[1], node.args[2]
    n = len(ctx.dims(x))
    size = ctx.shape(x)[norm_dim(dim, n)]
    layers = ctx.env.get(("stacked", x))
    if layers is not None and dim == 0:
        rest = list(ctx.dims(x))[1:]
        return rest[:-1] + [layers[index % size]]
    return _select_dims(ctx, x, norm_dim(dim, n), index % size)


@register_rule("aten.unbind")
def _unbind(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    n = len(ctx.dims(x))
    d = norm_dim(dim, n)
    return [_select_dims(ctx, x, d, i) for i in range(ctx.shape(x)[d])]


@register_rule("aten.slice", "aten.narrow")
def _slice(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    name = op_name(node.target)
    dim = node.args[1] if len(node.args) > 1 else 0
    d = norm_dim(dim, len(dx))
    n = sx[d]
    if name == "aten.narrow":
        start, length, step = node.args[2], node.args[3], 1
        end = start + length
    else:
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else n
        step = node.args[4] if len(node.args) > 4 else 1
    start = max(0, start + n if start < 0 else start)
    end = min(n, end + n if end < 0 else end)
    out = list(dx)
    if start == 0 and end >= n and step == 1:
        return out
    if step != 1 or end <= start:
        ctx.alg.fix(dx[d])
        out[d] = ctx.alg.fixed(ctx.out_shape(node)[d])
        return out
    sizes = [s for s in (start, end - start, n - end) if s > 0]
    try:
        segs = ctx.alg.split(dx[d], sizes)
        out[d] = segs[1 if start > 0 else 0]
    except StructureConflict:
        ctx.alg.conflict(f"slice [{start}:{end}] cuts the structure of axis {d} (size {n})", dx[d])
        out[d] = ctx.alg.fixed(end - start)
    return out


@register_rule("aten.index", "aten._unsafe_index")
def _index(ctx: Context, node: fx.Node) -> Any:
    x, indices = node.args[0], node.args[1]
    dx = list(ctx.dims(x))
    used = [i for i, ix in enumerate(indices) if ix is not None]
    for i in used:
        ctx.alg.fix(dx[i])
    if len(used) == 1:
        i = used[0]
        idx_dims = list(ctx.dims(indices[i]) or [])
        out = dx[:i] + idx_dims + dx[i + 1 :]
        if len(out) == len(ctx.out_shape(node)):
            return out
    return default_rule(ctx, node, "aten.index")


@register_rule("aten.index_select")
def _index_select(ctx: Context, node: fx.Node) -> Any:
    x, dim = node.args[0], node.args[1]
    dx = list(ctx.dims(x))
    d = norm_dim(dim, len(dx))
    ctx.alg.fix(dx[d])
    dx[d] = ctx.alg.fixed(ctx.out_shape(node)[d])
    return dx


@register_rule(
    "aten.constant_pad_nd",
    "aten.pad",
    "aten.reflection_pad1d",
    "aten.reflection_pad2d",
    "aten.replication_pad2d",
)
def _pad(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx = list(ctx.dims(x))
    pad = list(node.args[1])
    k = len(pad) // 2
    so = ctx.out_shape(node)
    for i in range(1, k + 1):
        if pad[2 * (i - 1)] or pad[2 * (i - 1) + 1]:
            ctx.alg.fix(dx[-i])
            dx[-i] = ctx.alg.fixed(so[-i])
    return dx


@register_rule("getitem")
def _getitem(ctx: Context, node: fx.Node) -> Any:
    src, i = node.args
    d = ctx.dims(src)
    stacked = ctx.stacked.get((src, i))
    if stacked is not None:
        layers, last = stacked
        # consumers that read the per-layer structure: a recurrent op's initial state,
        # or a selection along the layer axis; anything else ties every layer together
        aware = all(
            (
                op_name(u.target) in ("aten.lstm", "aten.gru", "aten.rnn_tanh", "aten.rnn_relu")
                and u.args[0] is not node
                and node
                in (list(u.args[1]) if isinstance(u.args[1], list | tuple) else [u.args[1]])
            )
            or (op_name(u.target) == "aten.select" and u.args[1] == 0)
            for u in node.users
        )
        if aware:
            ctx.env[("stacked", node)] = layers
        else:
            for h in layers:
                ctx.alg.unify(last, h, f"in {ctx.module_of(src)}")
    if isinstance(d, list) and i < len(d) and (d[i] is None or isinstance(d[i], list)):
        return d[i]
    return None


@register_rule(
    "aten.sym_size",
    "aten.sym_numel",
    "aten.sym_stride",
    "aten._assert_async",
    "aten._assert_scalar",
    "aten.sym_constrain_range_for_size",
    "aten._local_scalar_dense",
    "aten.item",
)
def _no_tensor(ctx: Context, node: fx.Node) -> Any:
    return None
