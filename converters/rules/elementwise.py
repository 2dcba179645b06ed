"""Elementwise ops: activations (with their scaling/sign action), arithmetic, constants,
positional ops, PReLU and GLU."""

from __future__ import annotations

from typing import Any

from torch import fx

from converters.dims import StructureConflict
from converters.rules.base import (
    RULES,
    Context,
    Rule,
    default_rule,
    norm_dim,
    op_name,
    register_rule,
)

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
        axes = [norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1), n)]
    elif name in ("aten.flip", "aten.roll"):
        dims = (
            node.args[-1]
            if name == "aten.flip"
            else (node.args[2] if len(node.args) > 2 else list(range(n)))
        )
        axes = [norm_dim(a, n) for a in (dims if isinstance(dims, list | tuple) else [dims])]
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
    d = norm_dim(node.args[1] if len(node.args) > 1 else -1, len(dx))
    half = ctx.shape(x)[d] // 2
    try:
        a, b = ctx.alg.split(dx[d], [half, half])
    except StructureConflict:
        return default_rule(ctx, node, "aten.glu")
    dx[d] = ctx.alg.unify(a, b, f"in {ctx.module_of(node)}")
    ctx.mark([dx[d]], "other")
    return dx
