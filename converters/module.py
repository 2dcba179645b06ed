"""``from_module``: discover the WeightSpace of any ``nn.Module`` by tracing it.

The model is exported to an ATen graph (``torch.export``, non-strict) and channel spaces
are propagated through it with one rule per op (:mod:`converters.rules`): linear, conv
and embedding create spaces, elementwise ops keep them, adds and attention contractions
tie them, cat/split give segments, reshapes give factors, reductions and model outputs end
them. An op no rule covers fixes every axis it touches, with one warning naming the op
and the module.

Then every state-dict tensor's axes are read off their variables: free leaves become
permutation groups, structure becomes segments and factors, and a group that always
travels with another (head_dim with its head) becomes indexed by it (a wreath product).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from converters.dims import Algebra, Var, find
from converters.norm_scale import find_norm_scales
from converters.rules import RULES, Context, default_rule, op_name
from metanet.space import (
    Axis,
    Factor,
    Group,
    NeuronSet,
    NormScale,
    TensorSpec,
    WeightSpace,
    _dtype_name,
)

__all__ = ["from_module", "ConverterWarning", "ConverterError", "trace"]


class ConverterWarning(UserWarning):
    """Axes were fixed that a rule could not keep: an op or module without a rule, or a
    structural conflict (named by op and module, with the free permutation dims lost)."""


class ConverterError(ValueError):
    """The model could not be traced."""


@dataclass
class Trace:
    """What tracing found: per state-dict tensor the variables of its axes."""

    algebra: Algebra
    weights: dict[str, list[Var | None]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    kinds: dict[str, str]
    values: list[list[Var | None]]
    activations: dict[int, set[str]]
    leaf_vars: list[Var]
    notes: list[str] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)
    param_of: dict = field(default_factory=dict)
    norm_scales: list[NormScale] = field(default_factory=list)


def _flatten_dims(d: Any) -> list[list[Var | None]]:
    if d is None:
        return []
    if isinstance(d, list) and (not d or not isinstance(d[0], list | tuple)):
        return [d]
    out = []
    for x in d:
        out += _flatten_dims(x)
    return out


def _uniform_dims(t: Tensor, alg: Algebra) -> list[Var | None]:
    """Axes along which a constant tensor varies are fixed; the others are wildcards."""
    dims: list[Var | None] = []
    for i, n in enumerate(t.shape):
        if n == 1 or t.numel() == 0:
            dims.append(None)
            continue
        first = t.narrow(i, 0, 1)
        dims.append(None if torch.equal(t, first.expand_as(t)) else alg.fixed(n))
    return dims


def trace(model: nn.Module, example_inputs: tuple | Tensor, rules: Mapping | None = None) -> Trace:
    """Export ``model`` and propagate channel variables through its graph."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, strict=False)
            if _mutates(ep.graph):
                # functional form: in-place writes through views become *_scatter ops
                # instead of mutations that later reads would not see
                ep = ep.run_decompositions({})
    except Exception as e:  # noqa: BLE001 - export raises many kinds
        raise ConverterError(
            f"torch.export could not trace {type(model).__name__} on the example inputs "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); data-dependent "
            "control flow is the usual cause: trace a wrapper without it, or describe the "
            "weights with converters.from_state_dict"
        ) from e
    finally:
        model.train(was_training)
    state = model.state_dict(keep_vars=True)
    alg = Algebra()
    sig = ep.graph_signature
    all_rules = dict(RULES)
    all_rules.update(
        {k.replace("::", ".") if isinstance(k, str) else k: r for k, r in (rules or {}).items()}
    )

    by_name: dict[str, Any] = {}
    for spec in sig.input_specs:
        by_name[spec.arg.name] = spec
    consts = dict(ep.constants)
    ep_state = ep.state_dict

    env: dict[Any, Any] = {}
    weights: dict[str, list[Var | None]] = {}
    tied: dict[tuple[int, tuple[int, ...]], list[Var | None]] = {}
    param_of: dict[Any, str] = {}
    ctx = Context(alg, env, module_of=_module_of, warn=[])
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = by_name.get(node.name)
            val = node.meta.get("val")
            if not isinstance(val, Tensor):
                env[node] = None
                continue
            kind = spec.kind.name if spec is not None else "USER_INPUT"
            target = spec.target if spec is not None else None
            if kind == "PARAMETER" or (kind == "BUFFER" and target in state):
                t = state.get(target)
                key = (t.data_ptr(), tuple(t.shape)) if isinstance(t, Tensor) else None
                # tied parameters may be lifted twice: both names share one set of axes
                dims = tied.get(key) or [alg.leaf(n) for n in val.shape]
                if key is not None:
                    tied[key] = dims
                weights[target] = dims
                param_of[node] = target
                ctx.params.add(node)
            elif kind in ("BUFFER", "CONSTANT_TENSOR"):
                real = ep_state.get(target) if kind == "BUFFER" else consts.get(target)
                dims = (
                    _uniform_dims(real, alg)
                    if isinstance(real, Tensor)
                    else [alg.fixed(n) for n in val.shape]
                )
            else:
                dims = [alg.fixed(n) for n in val.shape]
            env[node] = dims
        elif node.op == "call_function":
            name = op_name(node.target)
            alg.site = (name, _module_of(node))
            rule = all_rules.get(node.target) or all_rules.get(name)
            if rule is None:
                env[node] = default_rule(ctx, node, name)
            else:
                env[node] = rule(ctx, node)
        elif node.op == "output":
            for d in _flatten_dims([ctx.dims(a) for a in node.args[0]]):
                for v in d:
                    alg.fix(v)
        else:  # get_attr: submodules of higher-order ops
            env[node] = None

    # tied state-dict entries (e.g. an LM head sharing the embedding) share variables
    by_ptr: dict[tuple[int, tuple[int, ...]], str] = {}
    for name in weights:
        t = state.get(name)
        if isinstance(t, Tensor):
            by_ptr[(t.data_ptr(), tuple(t.shape))] = name
    notes = list(ctx.warn)
    for name, t in state.items():
        if name in weights or not isinstance(t, Tensor):
            continue
        alias = by_ptr.get((t.data_ptr(), tuple(t.shape)))
        if alias is not None:
            weights[name] = weights[alias]
        else:
            weights[name] = [alg.fixed(n) for n in t.shape]
            notes.append(f"{name}: not used by the traced forward; its axes are fixed")
    notes += [str(c) for c in alg.conflicts]
    values = [d for v in env.values() for d in _flatten_dims(v)] + list(weights.values())
    return Trace(
        algebra=alg,
        weights={k: weights[k] for k in state if k in weights},
        shapes={k: tuple(t.shape) for k, t in state.items()},
        dtypes={k: t.dtype for k, t in state.items()},
        kinds={
            k: "parameter" if isinstance(t, nn.Parameter) else "buffer" for k, t in state.items()
        },
        values=values,
        activations=ctx.activations,
        leaf_vars=ctx.leaf_vars,
        notes=notes,
        events=ctx.events,
        param_of=param_of,
        norm_scales=find_norm_scales(ep.graph, param_of),
    )


def _mutates(graph) -> bool:
    """Whether any op in the exported graph writes to one of its inputs."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "<top>"
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f"{path or '<top>'} ({cls_name.rsplit('.', 1)[-1]})"


# --------------------------------------------------------------------------- space building


def _segments(alg: Algebra, v: Var | None, size: int, notes: list[str]) -> list[list[Var | int]]:
    """An axis variable as segments of factors: free or fixed leaf variables, or ints
    (a fixed block of that size).

    A product distributes over a concatenation only when the concatenation is its
    leading factor (``(a ⊕ b) × c = a×c ⊕ b×c``); an inner one (``heads × (a ⊕ b)``,
    the two rotary halves of a head) interleaves and cannot be written as segments, so
    its leaves are fixed and it becomes one fixed block.
    """
    if v is None:
        return [[size]]
    r = find(v)
    if r.kind == "leaf":
        return [[r]]
    if r.kind == "cat":
        return [seg for c in r.children for seg in _segments(alg, c, find(c).size, notes)]
    factors = alg._flat_prod(r)
    segs = _segments(alg, factors[0], factors[0].size, notes)
    for f in factors[1:]:
        if f.kind == "cat":
            if alg.is_free(f):
                alg.conflict(
                    f"an axis interleaves a concatenation inside a product ({r!r}); its "
                    "inner parts are fixed",
                    f,
                )
                notes.append(str(alg.conflicts[-1]))
            segs = [s + [f.size] for s in segs]
        else:
            segs = [s + [f] for s in segs]
    return segs


@dataclass
class _Set:
    var: Var
    node: Any
    kind: str
    layer: int
    name: str


def _neuron_sets(tr: Trace):
    """Neuron sets (activation points) and which tensor connects or sits on which.

    Every weight used as a linear map creates the set of its outputs; its input set is
    the nearest set upstream with the same channel variable (found by walking the graph
    back from its input); adds of two activations from different sets create a residual
    set joined to both by identities; norm parameters and biases sit on their set.
    """
    sets: list[_Set] = []
    at_node: dict[Any, list[int]] = defaultdict(list)
    loose: dict[int, int] = {}  # var root -> set made for a channel with no producer
    edges: dict[str, tuple[int, int, int, int | None]] = {}
    on: dict[str, int] = {}
    identities: list[tuple[int, int]] = []

    def new_set(var, node, kind, layer, name) -> int:
        sets.append(_Set(var, node, kind, layer, name))
        if node is not None:
            at_node[node].append(len(sets) - 1)
        return len(sets) - 1

    def upstream(start: Any, var: Var, limit: int = 400) -> int | None:
        root = find(var)
        queue, seen = ([start] if start is not None else []), set()
        while queue and len(seen) < limit:
            n = queue.pop(0)
            if n in seen:
                continue
            seen.add(n)
            for sid in reversed(at_node.get(n, [])):
                if find(sets[sid].var) is root:
                    return sid
            queue += list(getattr(n, "all_input_nodes", []))
        return None

    def own(node: Any, var: Var) -> int | None:
        root = find(var)
        return next((i for i in reversed(at_node.get(node, [])) if find(sets[i].var) is root), None)

    def source(x: Any, node: Any, var: Var | None) -> int | None:
        if var is None:  # a single input channel: its own one-neuron set
            key = -id(x)
            if key not in loose:
                loose[key] = new_set(Var(1, fixed=True), None, "input", 0, "input")
            return loose[key]
        sid = own(node, var) if x is node else upstream(x, var)
        if sid is None:
            root = find(var)
            if root.id not in loose:
                fixed = not tr.algebra.is_free(var)
                loose[root.id] = new_set(var, None, "input" if fixed else "hidden", 0, "input")
            sid = loose[root.id]
        return sid

    for ev in tr.events:
        kind, node = ev[0], ev[1]
        if kind == "set":
            if ev[2] is not None:
                new_set(ev[2], node, "hidden", 1, node.name)
        elif kind == "edge":
            _, _, x, w, out_axis, in_axis, in_var, out_var = ev
            name = tr.param_of.get(w)
            if name is None:
                continue
            if out_var is None:  # a single output unit
                out_var = Var(1, fixed=True)
            src = source(x, node, in_var) if in_axis is not None else None
            dst = own(node, out_var)
            if dst is None:
                layer = sets[src].layer + 1 if src is not None else 1
                free = tr.algebra.is_free(out_var)
                dst = new_set(
                    out_var,
                    node,
                    "hidden" if free else "output",
                    layer,
                    name.removesuffix(".weight"),
                )
            if name not in edges:
                edges[name] = (dst, out_axis, src if src is not None else -1, in_axis)
        elif kind == "node":
            _, _, x, t, var, role = ev
            name = tr.param_of.get(t)
            if name is None or (var is None and x is not None):
                continue
            if var is None:  # the bias of a single output unit
                sid = at_node[node][-1] if at_node.get(node) else None
            else:
                sid = own(node, var) if x is None else upstream(x, var)
            if sid is not None and name not in on:
                on[name] = (sid, role)
        elif kind == "merge":
            _, _, ins, out = ev
            for var in reversed(out):
                if var is None:
                    continue
                found = [upstream(i, var) for i in ins]
                if any(f is None for f in found) or found[0] == found[1]:
                    continue
                layer = max(sets[f].layer for f in found)
                dst = new_set(var, node, "residual", layer, node.name)
                identities += [(f, dst) for f in found]
                break
    return sets, edges, on, identities


def build_space(tr: Trace) -> WeightSpace:
    alg = tr.algebra
    # every free leaf, in order of first appearance over the state dict
    names: dict[int, str] = {}
    sizes: dict[int, int] = {}
    raw_axes: dict[str, list[list[list[Var | int]]]] = {}
    notes = list(tr.notes)
    for tname, dims in tr.weights.items():  # first pass: fix what cannot be expressed
        alg.site = ("(axis layout)", tname)
        for v, n in zip(dims, tr.shapes[tname]):
            _segments(alg, v, n, notes)
    for tname, dims in tr.weights.items():
        shape = tr.shapes[tname]
        axes = []
        for i, (v, n) in enumerate(zip(dims, shape)):
            segs = _segments(alg, v, n, [])
            axes.append(segs)
            leaves = [
                f for seg in segs for f in seg if isinstance(f, Var) and not f.fixed and f.size > 1
            ]
            for j, leaf in enumerate(leaves):
                if leaf.id not in names:
                    base = tname.removesuffix(".weight")
                    suffix = f".{j}" if len(leaves) > 1 else ""
                    names[leaf.id] = f"{base}:{i}{suffix}"
                    sizes[leaf.id] = leaf.size
        raw_axes[tname] = axes

    # which free leaves occur together in every traced value (for indexed groups)
    common: dict[int, set[int]] = {}
    for dims in tr.values:
        present = {
            leaf.id for v in dims for leaf in alg.leaves(v) if not leaf.fixed and leaf.size > 1
        }
        for lid in present:
            common[lid] = present.copy() if lid not in common else common[lid] & present
    within: dict[int, int] = {}
    for axes in raw_axes.values():
        for segs in axes:
            for seg in segs:
                ids = [f.id if isinstance(f, Var) else None for f in seg]
                for j, lid in enumerate(ids):
                    if lid is None or lid not in names:
                        continue
                    for k in range(j - 1, -1, -1):
                        h = ids[k]
                        if h is not None and h in names and h in common.get(lid, ()):
                            within.setdefault(lid, h)
                            break
    # no nesting; every tensor holding an indexed leaf must hold its outer where the
    # WeightSpace can use it (earlier in the segment, or on exactly one other axis)
    for lid in list(within):
        if within[lid] in within:
            del within[lid]
    for axes in raw_axes.values():
        for i, segs in enumerate(axes):
            for seg in segs:
                ids = [f.id if isinstance(f, Var) else None for f in seg]
                for j, lid in enumerate(ids):
                    if lid not in within:
                        continue
                    h = within[lid]
                    if h in ids[:j]:
                        continue
                    others = [
                        a
                        for a, other in enumerate(axes)
                        if a != i
                        and any(isinstance(f, Var) and f.id == h for s in other for f in s)
                    ]
                    same_axis_elsewhere = any(
                        isinstance(f, Var) and f.id == h for s in segs for f in s
                    )
                    if len(others) != 1 or same_axis_elsewhere:
                        within.pop(lid, None)

    act: dict[int, set[str]] = defaultdict(set)
    for v in tr.leaf_vars:
        for leaf in alg.leaves(v):
            act[leaf.id] |= tr.activations.get(id(v), set())
    groups = []
    for lid, gname in names.items():
        kinds = act.get(lid, set())
        if "other" in kinds or ("pos" in kinds and "odd" in kinds):
            action = None
        elif "pos" in kinds:
            action = "positive_scale"
        elif "odd" in kinds:
            action = "sign"
        else:
            action = "gl"
        if lid in within.values():
            # an outer group (attention heads): each point is a block carrying its own
            # indexed group, and no GL or scaling mixes whole blocks (each head has its own
            # softmax); what acts continuously is the indexed group inside the blocks
            action = None
        outer = names[within[lid]] if lid in within else None
        groups.append(Group(gname, sizes[lid], within=outer, action=action))

    def to_axis(segs: list[list[Var | int]]) -> Axis:
        segments = []
        for seg in segs:
            factors = [
                Factor(None, f) if isinstance(f, int) else Factor(names.get(f.id), f.size)
                for f in seg
            ]
            segments.append(tuple(_merge_fixed(factors)))
        return Axis(tuple(segments))

    sets, edges, on, identities = _neuron_sets(tr)
    set_axes = [to_axis(_segments(alg, st.var, st.var.size, [])) for st in sets]
    set_names: list[str] = []
    taken: dict[str, int] = {}
    for st in sets:
        base = st.name
        taken[base] = taken.get(base, 0) + 1
        set_names.append(base if taken[base] == 1 else f"{base}#{taken[base] - 1}")
    used: set[int] = set()
    roles: dict[str, str] = {}

    tensors = []
    for tname, axes in raw_axes.items():
        spec_axes = tuple(to_axis(segs) for segs in axes)
        links: dict[str, Any] = {}
        if tname in edges:
            dst, out_axis, src, in_axis = edges[tname]
            if spec_axes[out_axis] == set_axes[dst]:
                links.update(out_set=set_names[dst], out_axis=out_axis)
                used.add(dst)
                if src >= 0 and in_axis is not None and spec_axes[in_axis] == set_axes[src]:
                    links.update(in_set=set_names[src], in_axis=in_axis)
                    used.add(src)
        elif tname in on:
            sid, role = on[tname]
            match = [i for i, a in enumerate(spec_axes) if a == set_axes[sid]]
            if len(match) == 1:
                links.update(out_set=set_names[sid], out_axis=match[0])
                roles[tname] = role
                used.add(sid)
        tensors.append(
            TensorSpec(
                tname,
                tr.shapes[tname],
                spec_axes,
                roles.get(tname) or _role(tname, tr),
                tr.kinds[tname],
                _dtype_name(tr.dtypes[tname]),
                **links,
            )
        )
    ident = [(a, b) for a, b in identities if set_axes[a] == set_axes[b]]
    used |= {i for pair in ident for i in pair}
    neuron_sets = [
        NeuronSet(set_names[i], set_axes[i], sets[i].kind, sets[i].layer) for i in sorted(used)
    ]
    return WeightSpace.build(
        groups,
        tensors,
        neuron_sets,
        identities=[(set_names[a], set_names[b]) for a, b in ident],
        notes=list(dict.fromkeys(notes)),
        norm_scales=tr.norm_scales,
    )


def _merge_fixed(factors: list[Factor]) -> list[Factor]:
    """Adjacent fixed factors merge into one; size-1 factors vanish."""
    out: list[Factor] = []
    for f in factors:
        if f.size == 1 and len(factors) > 1:
            continue
        if out and out[-1].group is None and f.group is None:
            out[-1] = Factor(None, out[-1].size * f.size)
        else:
            out.append(f)
    return out or [Factor(None, 1)]


def _role(name: str, tr: Trace) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("running_mean", "running_var"):
        return leaf
    if leaf == "bias":
        return "bias"
    return "weight" if len(tr.shapes[name]) >= 2 else "other"


def from_module(
    model: nn.Module,
    example_inputs: tuple | Tensor,
    rules: Mapping | None = None,
) -> WeightSpace:
    """The WeightSpace of any ``nn.Module``, found by tracing it on ``example_inputs``.

    Args:
        model: the network (traced in eval mode; its mode is restored).
        example_inputs: a tensor or tuple of positional inputs.
        rules: extra op rules for this call (see :func:`converters.register_rule`).

    Warns:
        ConverterWarning: once per op and module without a rule, naming both; the axes it
            touched are fixed. And once per structural conflict that fixed free axes
            (two structures no permutation satisfies both of, e.g. a channel shuffle read
            by a grouped conv whose groups cut its rows), naming the op, the module, what
            was fixed and how many free permutation dims were lost. Both are also listed
            in the space's notes (:meth:`WeightSpace.summary`).
    """
    tr = trace(model, example_inputs, rules)
    for note in dict.fromkeys(tr.notes):
        if note.startswith("no rule"):
            warnings.warn(note, ConverterWarning, stacklevel=2)
    space = build_space(tr)
    for c in dict.fromkeys(tr.algebra.conflicts):
        if c.lost:
            warnings.warn(str(c), ConverterWarning, stacklevel=2)
    return space
