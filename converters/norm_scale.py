"""Norm-induced scale invariance, found on the traced ATen graph.

A normalization ``N`` (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm) gives the
same output for ``s x`` as for ``x`` (``s > 0``; exactly when its ``eps`` is 0). Walk
back from its input through ops that are positively homogeneous of degree 1 (adds,
reshapes, pools, dropout, ReLU; scaled by ``s`` when their tensor inputs are) to the
tensors that *produce* the value: linear/conv/embedding weights with their biases, and
parameters added in (class tokens, positional embeddings). Walk forward from every value
on the way: each use must stay in the region or be the input of a normalization. Then
scaling every producer by ``s`` changes nothing downstream. A residual stream whose
every reader is a LayerNorm (pre-norm transformers) is one such region with one scale.

When every normalization of the region normalizes per channel (BatchNorm, InstanceNorm)
and the region keeps the channel axis in place (elementwise ops and spatial pools only),
each channel scales on its own: one factor per row of every producer, and BatchNorm's
running statistics follow (mean ``s``, variance ``s²``) so the invariance holds in eval
mode too.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from converters.rules.base import op_name
from metanet.space import NormScale

__all__ = ["find_norm_scales"]

_CHANNEL_NORMS = {
    "aten.batch_norm",
    "aten._native_batch_norm_legit_no_training",
    "aten._native_batch_norm_legit",
    "aten.native_batch_norm",
    "aten._native_batch_norm_legit_functional",
    "aten.instance_norm",
}
_GLOBAL_NORMS = {
    "aten.layer_norm",
    "aten.native_layer_norm",
    "aten.rms_norm",
    "aten._fused_rms_norm",
    "aten.group_norm",
    "aten.native_group_norm",
}
# degree-1 positively homogeneous and channel-preserving (same shape, channel axis kept)
_CHANNELWISE = {
    "aten.clone",
    "aten.contiguous",
    "aten.alias",
    "aten._to_copy",
    "aten.to",
    "aten.dropout",
    "aten.native_dropout",
    "aten.feature_dropout",
    "aten.relu",
    "aten.relu_",
    "aten.leaky_relu",
    "aten.leaky_relu_",
    "aten.neg",
    "aten.add",
    "aten.add_",
    "aten.sub",
    "aten.sub_",
    "aten.mul",
    "aten.mul_",
    "aten.div",
    "aten.div_",
    "aten.avg_pool1d",
    "aten.avg_pool2d",
    "aten.avg_pool3d",
    "aten.max_pool1d",
    "aten.max_pool2d",
    "aten.max_pool3d",
    "aten.max_pool2d_with_indices",
    "aten.adaptive_avg_pool1d",
    "aten.adaptive_avg_pool2d",
    "aten._adaptive_avg_pool2d",
    "aten.adaptive_max_pool2d",
    "getitem",
}
# degree-1 homogeneous but moving axes around: the region keeps one global scale
_RESHAPING = {
    "aten.view",
    "aten.reshape",
    "aten._unsafe_view",
    "aten.flatten",
    "aten.unflatten",
    "aten.permute",
    "aten.transpose",
    "aten.t",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.expand",
    "aten.cat",
    "aten.concat",
    "aten.stack",
    "aten.select",
    "aten.slice",
    "aten.narrow",
    "aten.split",
    "aten.split_with_sizes",
    "aten.chunk",
    "aten.unbind",
    "aten.repeat",
    "aten.mean",
    "aten.sum",
    "aten.upsample_nearest2d",
    "aten.upsample_bilinear2d",
}
_CONV = {
    "aten.conv1d",
    "aten.conv2d",
    "aten.conv3d",
    "aten.conv_transpose1d",
    "aten.conv_transpose2d",
    "aten.conv_transpose3d",
    "aten.convolution",
    "aten._convolution",
}


_PRODUCERS = _CONV | {"aten.linear", "aten.embedding"}


class _NotInvariant(Exception):
    """The region reaches something that does not commute with scaling."""


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, list | tuple) else [a]
        out += [x for x in items if isinstance(x, fx.Node) and _is_tensor(x)]
    return out


def _is_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return hasattr(val, "shape") or isinstance(val, list | tuple)


def _ndim(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if hasattr(val, "dim") else -1


class _Region:
    """One closed region: the values that scale together and what produces them."""

    def __init__(self, param_of: dict[Any, str]):
        self.param_of = param_of
        self.nodes: set[fx.Node] = set()
        self.norms: list[fx.Node] = []
        # (tensor name, axis of the output channel or None, producing node)
        self.producers: list[tuple[str, int | None, fx.Node]] = []
        self.channelwise = True

    def grow(self, start: fx.Node) -> None:
        """Close the region over inputs that must scale and uses that must follow."""
        todo = [(start, False)]
        while todo:
            n, forward = todo.pop()
            if n in self.nodes:
                continue
            if forward and (n.op != "call_function" or op_name(n.target) in _PRODUCERS):
                raise _NotInvariant  # a scaled value read by a linear map or returned
            self.nodes.add(n)
            todo += [(a, False) for a in self._inputs(n)]
            for u in n.users:
                if u in self.nodes:
                    continue
                name = op_name(u.target) if u.op == "call_function" else u.op
                if name in _CHANNEL_NORMS | _GLOBAL_NORMS:
                    if u.args[0] is not n or any(a is n for a in _tensor_inputs(u)[1:]):
                        raise _NotInvariant  # read as a norm's weight, not its input
                    if u not in self.norms:
                        self.norms.append(u)
                else:
                    todo.append((u, True))

    def _inputs(self, n: fx.Node) -> list[fx.Node]:
        """The inputs of ``n`` that must scale with it (raises if ``n`` cannot)."""
        if n.op == "placeholder":
            name = self.param_of.get(n)
            if name is None:
                raise _NotInvariant  # a model input or a constant
            self.producers.append((name, None, n))
            self.channelwise = False
            return []
        if n.op != "call_function":
            raise _NotInvariant
        name = op_name(n.target)
        ins = _tensor_inputs(n)
        if name in _CONV or name == "aten.linear":
            return self._produce(n, name)
        if name == "aten.embedding":
            self._param(n.args[0], None, n)
            self.channelwise = False
            return []
        if name in ("aten.mul", "aten.mul_", "aten.div", "aten.div_"):
            # times a constant or a learned scale: only the activation operand scales
            act = [a for a in ins if a not in self.param_of]
            if len(act) != 1 or (name.startswith("aten.div") and n.args[0] is not act[0]):
                raise _NotInvariant
            return act
        if name in ("aten.add", "aten.add_", "aten.sub", "aten.sub_"):
            others = [a for a in n.args[:2] if not isinstance(a, fx.Node)]
            if any(a != 0 for a in others):
                raise _NotInvariant  # x + c with a constant c: not homogeneous
            for a in ins:
                if a in self.param_of:  # a learned bias added in scales too
                    self.producers.append((self.param_of[a], None, a))
                    self.channelwise = False
            return [a for a in ins if a not in self.param_of]
        if name in _CHANNELWISE:
            return ins[:1] if name != "getitem" else ins
        if name in _RESHAPING:
            self.channelwise = False
            return ins
        raise _NotInvariant

    def _produce(self, n: fx.Node, name: str) -> list[fx.Node]:
        w = n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        transposed = name.startswith("aten.conv_transpose") or (
            name in ("aten.convolution", "aten._convolution") and bool(n.args[6])
        )
        groups = 1
        if name in ("aten.convolution", "aten._convolution"):
            groups = n.args[8]
        elif name in _CONV:
            groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
        row = 1 if transposed else 0
        if transposed and groups != 1 or (name == "aten.linear" and _ndim(n) != 2):
            self.channelwise = False
        self._param(w, row, n)
        if isinstance(b, fx.Node):
            self._param(b, 0, n)
        return []

    def _param(self, node: Any, axis: int | None, user: fx.Node) -> None:
        name = self.param_of.get(node)
        if name is None:
            raise _NotInvariant  # a computed weight: not a tensor of the state dict
        self.producers.append((name, axis, user))

    def to_norm_scale(self, name: str) -> NormScale | None:
        # every use of a produced state-dict tensor must be inside the region
        for _, _, via in self.producers:
            src = via if via.op == "placeholder" else None
            for p in [src] if src is not None else _tensor_inputs(via):
                if p in self.param_of and any(u not in self.nodes for u in p.users):
                    return None
        norm_names = [op_name(m.target) for m in self.norms]
        channel = self.channelwise and all(n in _CHANNEL_NORMS for n in norm_names)
        size = 1
        if channel:
            sizes = {m.args[0].meta["val"].shape[1] for m in self.norms}
            size = sizes.pop() if len(sizes) == 1 else 0
            channel = size > 1 and all(ax is not None for _, ax, _ in self.producers)
        members: list[tuple[str, int | None, int]] = []
        seen: set[str] = set()
        order = {name: i for i, name in enumerate(self.param_of.values())}
        for tname, axis, _ in sorted(self.producers, key=lambda p: order[p[0]]):
            if tname not in seen:
                seen.add(tname)
                members.append((tname, axis if channel else None, 1))
        for m in self.norms:
            if op_name(m.target) in _CHANNEL_NORMS:
                for arg, power in ((m.args[3], 1), (m.args[4], 2)):
                    tname = self.param_of.get(arg)
                    if tname is not None and tname not in seen:
                        seen.add(tname)
                        members.append((tname, 0 if channel else None, power))
        if not members:
            return None
        return NormScale(
            name,
            size if channel else 1,
            tuple(members),
            tuple(dict.fromkeys(_module_path(m) for m in self.norms)),
        )


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return op_name(node.target)
    path, _ = list(stack.values())[-1]
    return path or "<top>"


def find_norm_scales(graph: fx.Graph, param_of: dict[Any, str]) -> list[NormScale]:
    """Every closed region of a traced graph whose producers a normalization makes
    scale-invariant (see the module docstring), as :class:`NormScale` records."""
    out: list[NormScale] = []
    covered: set[fx.Node] = set()
    names: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_function" or op_name(node.target) not in (
            _CHANNEL_NORMS | _GLOBAL_NORMS
        ):
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or x in covered:
            continue
        region = _Region(param_of)
        try:
            region.grow(x)
        except _NotInvariant:
            covered |= region.nodes
            continue
        covered |= region.nodes
        ns = region.to_norm_scale("")
        if ns is None:
            continue
        first = ns.members[0][0]
        base = first.rsplit(".", 1)[0] if "." in first else first
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.add(name)
        out.append(NormScale(name, ns.size, ns.members, ns.norms))
    return out
