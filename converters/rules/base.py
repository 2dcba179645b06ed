"""The rule machinery: the :class:`Context` rules share, the registry, the fallback.

A rule takes the :class:`Context` and the ``torch.fx`` node and returns the output's axis
variables (a list per tensor output, nested lists for tuples). The rules themselves live
by op family in the sibling modules.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from converters.dims import Algebra, Var

__all__ = [
    "Context",
    "Rule",
    "RULES",
    "register_rule",
    "op_name",
    "default_rule",
    "norm_dim",
    "tensor_args",
    "flat_vars",
]

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
        for a in tensor_args(node):
            for v in self.dims(a) or []:
                if isinstance(v, Var):
                    self.alg.fix(v)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, list | tuple) else [a]
        out += [x for x in items if isinstance(x, fx.Node)]
    return out


def flat_vars(d: Any) -> list[Var]:
    if d is None:
        return []
    if isinstance(d, Var):
        return [d]
    if isinstance(d, list | tuple):
        return [v for x in d for v in flat_vars(x)]
    return []


def default_rule(ctx: Context, node: fx.Node, name: str) -> Any:
    """No rule: fix everything the op touches; warn if that loses a symmetry."""
    free = any(ctx.alg.is_free(v) for a in tensor_args(node) for v in flat_vars(ctx.dims(a)))
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


def norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d
