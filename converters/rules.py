"""One rule per ATen op: how channel variables flow through it.

A rule takes the :class:`Context` and the ``torch.fx`` node and returns the output's axis
variables (a list per tensor output, nested lists for tuples). Users add rules for their
own ops with :func:`register_rule`::

    @converters.register_rule("mylib::scaled_tanh")
    def _(ctx, node):
        return ctx.elementwise(node, activation="odd")
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from converters.dims import Algebra, StructureConflict, Var, find

__all__ = ["Context", "register_rule", "RULES", "op_name", "default_rule"]

Rule = Callable[["Context", fx.Node], Any]
RULES: dict[Any, Rule] = {}


def op_name(target: Any) -> str:
    """``aten.linear`` style name of a call target (overload dropped)."""
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "name", None)
    if callable(name):
        full = name()  # "aten::linear.default" -> "aten.linear"
        return full.split(".")[0].replace("::", ".")
    return getattr(target, "__name__", str(target))


def register_rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ops given as ``"aten.add"``/``"mylib::op"`` names or op objects."""

    def deco(fn: Rule) -> Rule:
        for op in ops:
            key = op.replace("::", ".") if isinstance(op, str) else op
            RULES[key] = fn
        return fn

    return deco


@dataclass
class Context:
    alg: Algebra
    env: dict
    module_of: Callable[[fx.Node], str]
    warn: list[str]
    activations: dict[int, set[str]] = field(default_factory=dict)
    leaf_vars: list[Var] = field(default_factory=list)
    stacked: dict = field(default_factory=dict)
    # graph events for neuron sets: ("edge", node, x, w, out_axis, in_axis, in_var,
    # out_var), ("node", node, x, tensor, var), ("bias", node, tensor, var),
    # ("merge", node, var)
    events: list[tuple] = field(default_factory=list)
    params: set = field(default_factory=set)  # placeholder nodes of state-dict tensors

    def edge(self, node, x, w, out_axis, in_axis, in_var, out_var) -> None:
        """Record that weight ``w`` maps the neurons of ``x`` (``in_var``) to the
        neurons of ``node``'s output (``out_var``)."""
        self.events.append(("edge", node, x, w, out_axis, in_axis, in_var, out_var))

    def on_set(self, node, x, tensor, var, role: str) -> None:
        """Record that ``tensor`` (a ``role``: bias, norm_weight, ...) sits on the neurons
        of ``x`` (``None``: of ``node``'s own output) with variable ``var``."""
        if isinstance(tensor, fx.Node):
            self.events.append(("node", node, x, tensor, var, role))

    # ---------------------------------------------------------------- helpers
    def dims(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        if isinstance(arg, list | tuple):
            return [self.dims(a) for a in arg]
        return None

    def shape(self, node: Any) -> tuple[int, ...] | None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        return None

    def out_shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.shape(node) or ()

    def mark(self, vars_: list[Var | None], kind: str) -> None:
        """Record that a nonlinearity of ``kind`` (pos/odd/other) acts on these axes."""
        for v in vars_:
            if v is not None:
                self.activations.setdefault(id(v), set()).add(kind)
                self.leaf_vars.append(v)

    def fixed_like(self, node: fx.Node) -> list[Var | None]:
        return [self.alg.fixed(n) for n in self.out_shape(node)]

    def broadcast(self, node: fx.Node, args: list[Any]) -> list[Var | None]:
        """Unify the axes of broadcast operands; returns the output's axes."""
        out_shape = self.out_shape(node)
        out: list[Var | None] = [None] * len(out_shape)
        for a in args:
            d = self.dims(a)
            shp = self.shape(a)
            if d is None or shp is None:
                continue
            off = len(out_shape) - len(d)
            for i, (v, n) in enumerate(zip(d, shp)):
                j = off + i
                if j < 0 or n == 1 or n != out_shape[j]:
                    continue
                out[j] = self.alg.unify(out[j], v, f"in {self.module_of(node)}")
        return out

    def elementwise(self, node: fx.Node, activation: str | None = None) -> list[Var | None]:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and self.shape(a) is not None]
        for v in node.kwargs.values():
            if isinstance(v, fx.Node) and self.shape(v) is not None:
                tensors.append(v)
        out_shape = self.out_shape(node)
        for a in tensors:
            shp = self.shape(a)
            off = len(out_shape) - len(shp)
            if off < 0 or any(n not in (1, out_shape[off + i]) for i, n in enumerate(shp)):
                # not a broadcast: this op is not elementwise after all
                return default_rule(self, node, op_name(node.target))
        out = self.broadcast(node, tensors)
        if activation:
            self.mark(out, activation)
        return out

    def fix_inputs(self, node: fx.Node) -> None:
        for a in _tensor_args(node):
            for v in self.dims(a) or []:
                if isinstance(v, Var):
                    self.alg.fix(v)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, list | tuple) else [a]
        out += [x for x in items if isinstance(x, fx.Node)]
    return out


def _flat_vars(d: Any) -> list[Var]:
    if d is None:
        return []
    if isinstance(d, Var):
        return [d]
    if isinstance(d, list | tuple):
        return [v for x in d for v in _flat_vars(x)]
    return []


def default_rule(ctx: Context, node: fx.Node, name: str) -> Any:
    """No rule: fix everything the op touches; warn if that loses a symmetry."""
    free = any(ctx.alg.is_free(v) for a in _tensor_args(node) for v in _flat_vars(ctx.dims(a)))
    if free:
        ctx.warn.append(
            f"no rule for op {name!r} in module {ctx.module_of(node)}: the axes it touches "
            "are fixed (register one with converters.register_rule)"
        )
    ctx.fix_inputs(node)
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        return [
            [ctx.alg.fixed(int(n)) for n in x.shape] if isinstance(x, torch.Tensor) else None
            for x in val
        ]
    if isinstance(val, torch.Tensor):
        return ctx.fixed_like(node)
    return None


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# ------------------------------------------------------------------------ elementwise

_ACTIVATION = {
    "relu": "pos",
    "relu_": "pos",
    "leaky_relu": "pos",
    "leaky_relu_": "pos",
    "rrelu": "pos",
    "tanh": "odd",
    "tanh_": "odd",
    "sin": "odd",
    "sin_": "odd",
    "sinh": "odd",
    "asinh": "odd",
    "atan": "odd",
    "erf": "odd",
    "softsign": "odd",
}
_OTHER_UNARY = [
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "sigmoid",
    "sigmoid_",
    "hardtanh",
    "hardtanh_",
    "elu",
    "elu_",
    "selu",
    "selu_",
    "celu",
    "softplus",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardsigmoid_",
    "mish",
    "exp",
    "exp_",
    "log",
    "log1p",
    "expm1",
    "cos",
    "cos_",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "abs",
    "square",
    "pow",
    "logit",
    "log_sigmoid_forward",
    "special_erf",
    "sign",
    "floor",
    "ceil",
    "round",
    "trunc",
    "frac",
]
_LINEAR_ELEMENTWISE = [
    "add",
    "add_",
    "sub",
    "sub_",
    "rsub",
    "mul",
    "mul_",
    "div",
    "div_",
    "neg",
    "neg_",
    "clone",
    "contiguous",
    "detach",
    "detach_",
    "alias",
    "lift_fresh_copy",
    "_to_copy",
    "to",
    "type_as",
    "dropout",
    "dropout_",
    "native_dropout",
    "feature_dropout",
    "alpha_dropout",
    "copy",
    "copy_",
    "true_divide",
    "_assert_tensor_metadata",
]
# pointwise but not scaling-transparent: the axes they touch lose any scaling annotation
_OTHER_ELEMENTWISE = [
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_max",
    "where",
    "masked_fill",
    "masked_fill_",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_not",
    "logical_xor",
    "__and__",
    "__or__",
    "__xor__",
    "bitwise_and",
    "bitwise_or",
    "bitwise_not",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "lerp",
    "addcmul",
    "addcdiv",
    "isnan",
    "isinf",
    "nan_to_num",
    "fill",
    "remainder",
    "fmod",
    "floor_divide",
    "relu6",
    "hardtanh",
]


def _elementwise_rule(kind: str | None) -> Rule:
    def rule(ctx: Context, node: fx.Node) -> Any:
        if ctx.shape(node) is None:
            return None
        name = op_name(node.target)
        if name == "aten.native_dropout":
            out = ctx.elementwise(node)
            return [out, out]
        out = ctx.elementwise(node, kind)
        if name in ("aten.add", "aten.add_", "aten.sub", "aten.sub_", "aten.mul", "aten.mul_"):
            ins = [a for a in node.args[:2] if isinstance(a, fx.Node) and ctx.shape(a)]
            params = [a for a in ins if a in ctx.params]
            if len(ins) == 2 and len(params) == 1:
                # a learned vector/table added to or scaling an activation sits on its set
                other = ins[0] if ins[1] is params[0] else ins[1]
                role = "norm_weight" if name.startswith("aten.mul") else "bias"
                for v in reversed(ctx.dims(params[0]) or []):
                    if v is not None:
                        ctx.on_set(
                            node,
                            other,
                            params[0],
                            v,
                            role if len(ctx.shape(params[0])) == 1 else "other",
                        )
                        break
            elif len(ins) == 2 and not params and out and not name.startswith("aten.mul"):
                ctx.events.append(("merge", node, ins, out))
            elif len(ins) == 2 and not params and name.startswith("aten.mul"):
                ctx.mark(out, "other")  # a product of two activations is not linear
        return out

    return rule


for _n, _k in _ACTIVATION.items():
    RULES[f"aten.{_n}"] = _elementwise_rule(_k)
for _n in _OTHER_UNARY:
    RULES[f"aten.{_n}"] = _elementwise_rule("other")
for _n in _LINEAR_ELEMENTWISE:
    RULES[f"aten.{_n}"] = _elementwise_rule(None)
for _n in _OTHER_ELEMENTWISE:
    RULES[f"aten.{_n}"] = _elementwise_rule("other")
RULES["aten.native_dropout"] = _elementwise_rule(None)


@register_rule(
    "aten.zeros_like",
    "aten.ones_like",
    "aten.full_like",
    "aten.empty_like",
    "aten.zeros",
    "aten.ones",
    "aten.full",
    "aten.empty",
    "aten.new_zeros",
    "aten.new_ones",
    "aten.new_full",
    "aten.new_empty",
    "aten.scalar_tensor",
    "aten.empty_strided",
    "aten.empty_permuted",
)
def _uniform(ctx: Context, node: fx.Node) -> Any:
    # constant along every axis: imposes nothing
    return [None] * len(ctx.out_shape(node))


@register_rule(
    "aten.arange",
    "aten.linspace",
    "aten.rand",
    "aten.randn",
    "aten.randint",
    "aten.rand_like",
    "aten.randn_like",
    "aten.bernoulli",
    "aten.eye",
    "aten.triu",
    "aten.tril",
    "aten.cumsum",
    "aten.cumprod",
    "aten.diff",
    "aten.flip",
    "aten.roll",
)
def _positional(ctx: Context, node: fx.Node) -> Any:
    """Ops whose values depend on positions along their axes: fix those axes."""
    name = op_name(node.target)
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if x is None:
        return ctx.fixed_like(node)
    d = list(ctx.dims(x) or [])
    n = len(d)
    if name in ("aten.triu", "aten.tril"):
        axes = [n - 2, n - 1]
    elif name in ("aten.cumsum", "aten.cumprod", "aten.diff"):
        axes = [_norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1), n)]
    elif name in ("aten.flip", "aten.roll"):
        dims = (
            node.args[-1]
            if name == "aten.flip"
            else (node.args[2] if len(node.args) > 2 else list(range(n)))
        )
        axes = [_norm_dim(a, n) for a in (dims if isinstance(dims, list | tuple) else [dims])]
    else:
        axes = list(range(n))
    if len(ctx.out_shape(node)) != n:
        ctx.fix_inputs(node)
        return ctx.fixed_like(node)
    out_shape = ctx.out_shape(node)
    for a in axes:
        ctx.alg.fix(d[a])
        # the result varies along these axes even when the input was constant there
        d[a] = ctx.alg.fixed(out_shape[a])
    return d


# ------------------------------------------------------------------------ linear maps


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
            ctx.alg.fix(dx[cin_axis])
            ctx.alg.fix(dw[0])
            ctx.alg.fix(dw[1])
            ctx.alg.conflicts.append(f"grouped convolution {where}: channel structure conflict")
            out_c = dw[out_w]
    if groups == 1:
        ctx.edge(node, x, w, out_w, in_w, dw[in_w], out_c)
    else:  # block-diagonal: the kernel's input axis holds one group's channels only
        ctx.edge(node, x, w, out_w, None, None, out_c)
    if isinstance(b, fx.Node):
        ctx.alg.unify(ctx.dims(b)[0], out_c, where)
        ctx.on_set(node, None, b, out_c, "bias")
    spatial = [ctx.alg.fixed(n) for n in out_shape[cin_axis + 1 :]]
    return ([dx[0]] if batched else []) + [out_c] + spatial


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


# ------------------------------------------------------------------------ normalization


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
        ctx.alg.fix(dx[1])
    for a, role in ((w, "norm_weight"), (b, "norm_bias")):
        if isinstance(a, fx.Node):
            ctx.alg.unify(dx[1], ctx.dims(a)[0], f"in {ctx.module_of(node)}")
            ctx.on_set(node, x, a, dx[1], role)
    ctx.mark([dx[1]], "other")
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        return [dx, [dx[0], None], [dx[0], None]]
    return dx


@register_rule(
    "aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten._safe_softmax"
)
def _softmax(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    ctx.mark([dx[_norm_dim(node.args[1], len(dx))]], "other")
    return dx


# ------------------------------------------------------------------------ reductions


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
        dims = {_norm_dim(d, n) for d in dim_arg}
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
    d = _norm_dim(d, len(dx))
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


# ------------------------------------------------------------------------ shape ops


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
        alg.conflicts.append(f"reshape {sx} -> {so} in {ctx.module_of(node)}: axes fixed")
        for v in dx:
            alg.fix(v)
        return [alg.fixed(n) for n in so]
    return result


@register_rule("aten.permute")
def _permute(ctx: Context, node: fx.Node) -> Any:
    dx = ctx.dims(node.args[0])
    return [dx[_norm_dim(p, len(dx))] for p in node.args[1]]


@register_rule("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    a, b = (_norm_dim(d, len(dx)) for d in node.args[1:3])
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
    src = [_norm_dim(s, n) for s in src]
    dst = [_norm_dim(d, n) for d in dst]
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(n) if i not in src)
    return [dx[o if o is not None else next(rest)] for o in order]


@register_rule("aten.unsqueeze")
def _unsqueeze(ctx: Context, node: fx.Node) -> Any:
    dx = list(ctx.dims(node.args[0]))
    d = _norm_dim(node.args[1], len(dx) + 1)
    return dx[:d] + [None] + dx[d:]


@register_rule("aten.squeeze")
def _squeeze(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    if len(node.args) < 2:
        return [v for v, n in zip(dx, sx) if n != 1]
    dims = node.args[1] if isinstance(node.args[1], list | tuple) else [node.args[1]]
    drop = {_norm_dim(d, len(dx)) for d in dims if sx[_norm_dim(d, len(dx))] == 1}
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
    d = _norm_dim(dim, len(dx))
    dx[d] = ctx.alg.prod([dx[d], ctx.alg.leaf(reps)])
    return dx


@register_rule("aten.cat", "aten.concat", "aten.concatenate")
def _cat(ctx: Context, node: fx.Node) -> Any:
    tensors = [t for t in node.args[0] if ctx.shape(t) is not None and ctx.shape(t) != (0,)]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    so = ctx.out_shape(node)
    d = _norm_dim(dim, len(so))
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
    d = _norm_dim(dim, len(so))
    out: list[Var | None] = [None] * (len(so) - 1)
    for t in tensors:
        for i, v in enumerate(ctx.dims(t)):
            out[i] = ctx.alg.unify(out[i], v, f"in {ctx.module_of(node)}")
    return out[:d] + [ctx.alg.fixed(len(tensors))] + out[d:]


def _split_outputs(ctx: Context, node: fx.Node, dim: int, sizes: list[int]) -> Any:
    x = node.args[0]
    dx = list(ctx.dims(x))
    d = _norm_dim(dim, len(dx))
    try:
        segs = ctx.alg.split(dx[d], sizes)
    except StructureConflict:
        ctx.alg.fix(dx[d])
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
    n = sx[_norm_dim(dim, len(sx))]
    if isinstance(size, int):
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(size)
    return _split_outputs(ctx, node, dim, sizes)


@register_rule("aten.chunk")
def _chunk(ctx: Context, node: fx.Node) -> Any:
    val = node.meta["val"]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    d = _norm_dim(dim, val[0].dim())
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
    size = ctx.shape(x)[_norm_dim(dim, n)]
    layers = ctx.env.get(("stacked", x))
    if layers is not None and dim == 0:
        rest = list(ctx.dims(x))[1:]
        return rest[:-1] + [layers[index % size]]
    return _select_dims(ctx, x, _norm_dim(dim, n), index % size)


@register_rule("aten.unbind")
def _unbind(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    n = len(ctx.dims(x))
    d = _norm_dim(dim, n)
    return [_select_dims(ctx, x, d, i) for i in range(ctx.shape(x)[d])]


@register_rule("aten.slice", "aten.narrow")
def _slice(ctx: Context, node: fx.Node) -> Any:
    x = node.args[0]
    dx, sx = list(ctx.dims(x)), ctx.shape(x)
    name = op_name(node.target)
    dim = node.args[1] if len(node.args) > 1 else 0
    d = _norm_dim(dim, len(dx))
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
        ctx.alg.fix(dx[d])
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
    d = _norm_dim(dim, len(dx))
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
    """Pooling/resampling over the trailing spatial axes; batch and channels pass through."""
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
    for v in dx[lead:]:
        ctx.alg.fix(v)
    out = dx[:lead] + [ctx.alg.fixed(n) for n in shp[lead:]]
    if isinstance(val, list | tuple):
        return [out, list(out)]
    return out


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


# ------------------------------------------------------------------------ recurrent


def _recurrent(gates: int) -> Rule:
    def rule(ctx: Context, node: fx.Node) -> Any:
        x, hx, params = node.args[0], node.args[1], node.args[2]
        has_biases, num_layers, _, _, bidirectional, batch_first = node.args[3:9]
        alg = ctx.alg
        where = f"in {ctx.module_of(node)}"
        hx = hx if isinstance(hx, list | tuple) else [hx]
        per = 4 if has_biases else 2
        dirs = 2 if bidirectional else 1
        if len(params) != num_layers * dirs * per:  # e.g. LSTM with proj_size
            return default_rule(ctx, node, op_name(node.target) + " (projections)")
        dx = list(ctx.dims(x))
        in_var = dx[-1]
        hidden = []
        for layer in range(num_layers):
            outs = []
            for dr in range(dirs):
                p = params[(layer * dirs + dr) * per : (layer * dirs + dr + 1) * per]
                w_ih, w_hh = ctx.dims(p[0]), ctx.dims(p[1])
                h = alg.leaf(ctx.shape(p[1])[1])
                gate = alg.concat([h] * gates, [ctx.shape(p[1])[1]] * gates)
                alg.unify(w_ih[0], gate, where)
                alg.unify(w_hh[0], gate, where)
                alg.unify(w_hh[1], h, where)
                alg.unify(w_ih[1], in_var, where)
                ctx.events.append(("set", node, h))
                ctx.edge(node, x if layer == 0 else node, p[0], 0, 1, in_var, gate)
                ctx.edge(node, node, p[1], 0, 1, h, gate)
                for b in p[2:]:
                    alg.unify(ctx.dims(b)[0], gate, where)
                    ctx.on_set(node, node, b, gate, "bias")
                ctx.mark([h], "other")
                outs.append(h)
            in_var = outs[0] if dirs == 1 else alg.concat(outs, [ctx.shape(params[1])[1]] * 2)
            hidden.append(outs)
        # initial states: constant ones impose nothing; given ones pin the units they feed
        for h0 in hx:
            if any(v is not None for v in ctx.dims(h0) or []):
                if num_layers * dirs == 1:
                    alg.unify(ctx.dims(h0)[-1], hidden[0][0], where)
                else:
                    src = ctx.env.get(("stacked", h0))
                    if (
                        src is not None
                        and len(src) == num_layers * dirs
                        and len(ctx.dims(h0)) in (2, 3)
                    ):
                        for a, b in zip(src, [h for hs in hidden for h in hs]):
                            alg.unify(a, b, where)
                    else:
                        for hs in hidden:
                            for h in hs:
                                alg.fix(h)
                if ctx.env.get(("stacked", h0)) is None:
                    # a learned or given initial state: its own axes are pinned too
                    for v in ctx.dims(h0) or []:
                        alg.fix(v)
        seq_out = dx[:-1] + [in_var]
        layers = [h for hs in hidden for h in hs]
        batch = [dx[0] if batch_first else dx[1]] if len(dx) == 3 else []
        finals = []
        for i in range(len(node.meta["val"]) - 1):
            # (layers, batch, hidden): one hidden variable per layer along axis 0
            last = layers[0] if len(layers) == 1 else alg.leaf(ctx.shape(params[1])[1])
            # the leading axis holds one entry per layer and direction: positions, fixed
            finals.append([alg.fixed(num_layers * dirs)] + batch + [last])
            ctx.stacked[(node, i + 1)] = (layers, last)
        return [seq_out] + finals

    return rule


RULES["aten.lstm"] = _recurrent(4)
RULES["aten.gru"] = _recurrent(3)
RULES["aten.rnn_tanh"] = _recurrent(1)
RULES["aten.rnn_relu"] = _recurrent(1)


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


@register_rule("aten.prelu", "aten._prelu_kernel")
def _prelu(ctx: Context, node: fx.Node) -> Any:
    """PReLU: its weight has one slope per channel (axis 1, or 0 for 1-D input)."""
    x, w = node.args[0], node.args[1]
    dx = list(ctx.dims(x))
    if ctx.shape(w) and ctx.shape(w)[0] > 1:
        c = 1 if len(dx) > 1 else 0
        dx[c] = ctx.alg.unify(dx[c], ctx.dims(w)[0], f"in {ctx.module_of(node)}")
        ctx.on_set(node, x, w, dx[c], "other")
    ctx.mark(dx, "pos")
    return dx


@register_rule("aten.glu")
def _glu(ctx: Context, node: fx.Node) -> Any:
    """GLU: ``a * sigmoid(b)`` for the two halves of an axis, which are thereby tied."""
    x = node.args[0]
    dx = list(ctx.dims(x))
    d = _norm_dim(node.args[1] if len(node.args) > 1 else -1, len(dx))
    half = ctx.shape(x)[d] // 2
    try:
        a, b = ctx.alg.split(dx[d], [half, half])
    except StructureConflict:
        return default_rule(ctx, node, "aten.glu")
    dx[d] = ctx.alg.unify(a, b, f"in {ctx.module_of(node)}")
    ctx.mark([dx[d]], "other")
    return dx


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
