"""Parameter graphs: a network's weights as a PyTorch Geometric graph.

Nodes are neurons (every neuron set of the :class:`~metanet.WeightSpace`, in order);
edges are weights, flowing from input neuron to output neuron. The graph converts back to
the weights exactly (:func:`to_weights`) and is built with a handful of bulk tensor
copies into preallocated buffers: no Python loop runs per neuron or per weight. Per-edge
block ids and types are not stored (they would cost more than the weights of a dense
layer); ``graph.edge_block()`` and ``graph.edge_type()`` expand them from the per-block
tables when needed.

Kernels and ``edge_dim``: every edge carries ``T = edge_dim`` feature slots. A kernel with
``k`` taps becomes ``ceil(k / T)`` parallel edges per (input, output) neuron pair, each
holding ``T`` consecutive taps (row-major; the last one zero-padded); each such *chunk* of
the tensor is its own block, so ``tap_pos`` says which taps an edge holds. The default
``T`` is the tap count (or 1) that minimises the bytes of ``edge_index + edge_attr``, so
a graph costs memory in proportion to the weights: a ViT's 16x16 patch conv no longer
pads every other edge to 256 slots. Graphs of kernel-free spaces (MLPs, SIRENs) have
``T = 1``, one edge per weight; a CNN of 3x3 convs keeps ``T = 9``, one edge per kernel.

Integer and bool tensors (``num_batches_tracked``, ``relative_position_index``) are not
weight features: they are kept exactly in ``rest_int``, never in ``x`` or ``edge_attr``.

==================  ====================  =================================================
attribute           shape                 meaning
==================  ====================  =================================================
``x``               ``(N, F)``            node features: ``F >= 5`` columns, 0-4 for
                                          bias, norm weight, norm bias, running mean,
                                          running var; later ones for other node tensors
``node_type``       ``(N,)``              0 input, 1 hidden, 2 output, 3 residual point
``node_layer``      ``(N,)``              depth of the neuron's set
``node_pos``        ``(N,)``              index along the fixed factors of its set (so input
                                          and output neurons are distinguishable), -1 if
                                          every factor is permutable
``node_action``     ``(N,)``              the continuous action on the neuron
                                          (:func:`node_actions`): 0 none, 1 sign, 2
                                          positive scale
``edge_index``      ``(2, E)``            ``[source (input neuron), target (output neuron)]``
``edge_attr``       ``(E, T)``            weight value, or ``T`` kernel taps (zero-padded)
``block_type``      ``(B,)``              0 dense weight, 1 kernel (has taps), 2 identity;
                                          a block is one chunk of an edge tensor, or an
                                          identity map
``block_size``      ``(B,)``              its number of edges (blocks are consecutive)
``block_taps``      ``(B,)``              number of valid taps of the block
``tap_pos``         ``(B, T, 3)``         tap offsets from the kernel centre (up to 3-D)
``rest``            ``(R,)``              floating tensors on no neuron set
``rest_int``        ``(R_int,)``          integer/bool tensors, as int64
==================  ====================  =================================================
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.data import Data

from metanet.space import NODE_ROLES, TensorSpec, WeightSpace, WeightSpaceError, _torch_dtype

__all__ = [
    "ParamGraph",
    "to_graph",
    "to_weights",
    "node_permutation",
    "GraphLayout",
    "GraphGather",
    "feature_tensors",
    "is_feature",
    "node_actions",
    "random_node_scales",
    "scale_nodes",
    "ACTION_NONE",
    "ACTION_SIGN",
    "ACTION_SCALE",
]

NODE_TYPES = {"input": 0, "hidden": 1, "output": 2, "residual": 3}
BLOCK_DENSE, BLOCK_KERNEL, BLOCK_IDENTITY = 0, 1, 2
ACTION_NONE, ACTION_SIGN, ACTION_SCALE = 0, 1, 2
_ACTION_CODES = {"sign": ACTION_SIGN, "positive_scale": ACTION_SCALE}
# node tensors that follow their neuron's sign or positive scale: a bias, and the
# neuron's activations at probe inputs (odd and positively homogeneous activations)
_SCALED_NODE_ROLES = ("bias", "probe")


class ParamGraph(Data):
    """A :class:`torch_geometric.data.Data` holding one network's parameter graph.

    Batches with :class:`torch_geometric.data.Batch` and PyG's ``DataLoader``; graphs of
    different architectures batch together when built with the same ``node_dim`` and
    ``edge_dim`` (see :func:`to_graph`).
    """

    def edge_block(self) -> Tensor:
        """Per-edge block index ``(E,)`` (into ``block_type``/``block_taps``/``tap_pos``);
        on a batch it indexes the batched block tables."""
        return torch.repeat_interleave(
            torch.arange(self.block_size.numel(), device=self.block_size.device), self.block_size
        )

    def edge_type(self) -> Tensor:
        """Per-edge block type ``(E,)``: 0 dense weight, 1 kernel, 2 identity."""
        return torch.repeat_interleave(self.block_type, self.block_size)

    def to_networkx(self):
        """A ``networkx.DiGraph`` for inspection and drawing (small graphs only).

        Nodes carry ``x``, ``node_type``, ``node_layer``, ``node_pos``; edges carry
        ``weight`` (first feature), ``attr`` (all features) and ``block_type``.
        """
        import networkx as nx

        g = nx.DiGraph()
        x = self.x.tolist()
        for i, (t, layer, pos) in enumerate(
            zip(self.node_type.tolist(), self.node_layer.tolist(), self.node_pos.tolist())
        ):
            g.add_node(i, x=x[i], node_type=t, node_layer=layer, node_pos=pos)
        btype = self.edge_type().tolist()
        attr = self.edge_attr.tolist()
        for e, (s, d) in enumerate(self.edge_index.t().tolist()):
            g.add_edge(s, d, weight=attr[e][0], attr=attr[e], block_type=btype[e])
        return g


def is_feature(t: TensorSpec) -> bool:
    """Whether a tensor is a weight feature: floating point (integer and bool buffers, such
    as ``num_batches_tracked`` or ``relative_position_index``, are bookkeeping)."""
    return _torch_dtype(t.dtype).is_floating_point


def _on_nodes(t: TensorSpec) -> bool:
    """Whether a node tensor can be node features: only its neuron axis may be permuted.
    A grouped conv whose per-group input axis is permuted too (e.g. after a channel
    shuffle) would have its feature columns reordered by the group, which no node
    relabelling does; such tensors are kept in ``rest`` (exact round trip, not read by
    the graph models) rather than stored in a way the symmetry breaks."""
    return t.is_node and all(not a.groups for i, a in enumerate(t.axes) if i != t.out_axis)


def feature_tensors(space: WeightSpace) -> list[str]:
    """Names of the space's weight-feature tensors (see :func:`is_feature`), in order."""
    return [n for n, t in space.tensors.items() if is_feature(t)]


# bytes per edge of edge_index (two int64) and per feature slot of edge_attr (float32):
# the cost the default edge_dim minimises
_INDEX_BYTES, _SLOT_BYTES = 16, 4


def _default_edge_dim(pairs_and_taps: list[tuple[int, int]]) -> int:
    """The slot count ``T`` minimising ``sum pairs * ceil(taps / T) * (16 + 4 T)`` over the
    edge tensors (ties: the larger ``T``, fewer edges); candidates are the tap counts."""
    best, best_cost = 1, None
    for width in sorted({1, *(k for _, k in pairs_and_taps)}, reverse=True):
        cost = sum(p * -(-k // width) for p, k in pairs_and_taps) * (
            _INDEX_BYTES + _SLOT_BYTES * width
        )
        if best_cost is None or cost < best_cost:
            best, best_cost = width, cost
    return best


@dataclass(frozen=True)
class GraphLayout:
    """Where every tensor of a space lives in its graph (computed from the space alone).

    ``edge_offset[name]`` is the first edge of an edge tensor; its ``edge_chunks[name]``
    chunks of ``edge_dim`` taps follow one another, each ``out * in`` edges long.
    """

    set_offset: dict[str, int]
    num_nodes: int
    node_columns: dict[str, tuple[int, int]]  # node tensor -> (first column, count)
    node_dim: int
    edge_offset: dict[str, int]  # edge tensor -> first edge
    edge_chunks: dict[str, int]  # edge tensor -> number of chunks of edge_dim taps
    identity_offset: tuple[int, ...]
    num_edges: int
    edge_dim: int
    rest_offset: dict[str, int]
    rest_size: int
    rest_int_offset: dict[str, int]
    rest_int_size: int

    @property
    def num_blocks(self) -> int:
        return sum(self.edge_chunks.values()) + len(self.identity_offset)

    @classmethod
    def of(cls, space: WeightSpace, node_dim: int | None = None, edge_dim: int | None = None):
        set_offset, n = {}, 0
        for s in space.neuron_sets.values():
            set_offset[s.name] = n
            n += s.axis.size

        # Known roles take fixed columns; every other node tensor takes the next free
        # columns after them on its set, so different sets reuse the same extra columns.
        node_columns: dict[str, tuple[int, int]] = {}
        used: dict[str, set[int]] = {}
        next_free: dict[str, int] = {}
        width = len(NODE_ROLES)
        features = [t for t in space.tensors.values() if is_feature(t)]
        for t in features:
            if not _on_nodes(t):
                continue
            k = math.prod(t.tap_shape)
            taken = used.setdefault(t.out_set, set())
            if t.role in NODE_ROLES and k == 1 and NODE_ROLES.index(t.role) not in taken:
                col = NODE_ROLES.index(t.role)
            else:
                col = next_free.get(t.out_set, len(NODE_ROLES))
                next_free[t.out_set] = col + k
            taken.update(range(col, col + k))
            node_columns[t.name] = (col, k)
            width = max(width, col + k)

        sizes = {s.name: s.axis.size for s in space.neuron_sets.values()}
        edges = [t for t in features if t.is_edge]
        pairs_taps = [(sizes[t.out_set] * sizes[t.in_set], math.prod(t.tap_shape)) for t in edges]
        if edge_dim is not None and edge_dim < 1:
            raise WeightSpaceError(
                f"edge_dim={edge_dim} is too small: an edge holds at least 1 tap (pass "
                "edge_dim >= 1, or None for the default)"
            )
        taps = edge_dim or _default_edge_dim(pairs_taps)
        edge_offset, edge_chunks, e = {}, {}, 0
        for t, (pairs, k) in zip(edges, pairs_taps):
            edge_offset[t.name], edge_chunks[t.name] = e, -(-k // taps)
            e += pairs * edge_chunks[t.name]
        identity_offset = []
        for a, _ in space.identities:
            identity_offset.append(e)
            e += sizes[a]

        rest_offset, r, rest_int_offset, ri = {}, 0, {}, 0
        for t in space.tensors.values():
            if not is_feature(t):
                rest_int_offset[t.name] = ri
                ri += math.prod(t.shape)
            elif not t.is_edge and not _on_nodes(t):
                rest_offset[t.name] = r
                r += math.prod(t.shape)

        if node_dim is not None and node_dim < width:
            raise WeightSpaceError(f"node_dim={node_dim} is too small: this space needs {width}")
        return cls(
            set_offset,
            n,
            node_columns,
            node_dim or width,
            edge_offset,
            edge_chunks,
            tuple(identity_offset),
            e,
            taps,
            rest_offset,
            r,
            rest_int_offset,
            ri,
        )


def _is_simple(axis, group: str) -> bool:
    """Whether ``axis`` is exactly the points of ``group``: one segment of one factor."""
    return len(axis.segments) == 1 and [f.group for f in axis.segments[0]] == [group]


def node_actions(space: WeightSpace) -> dict[str, int]:
    """Per neuron set, the continuous action on its neurons that the graph shows plainly
    (:data:`ACTION_SIGN` or :data:`ACTION_SCALE`; sets missing from the result:
    :data:`ACTION_NONE`).

    Neuron ``i`` of such a set carries a factor ``q_i`` (``±1`` for a sign group, ``> 0``
    for a positive-scale one; ``q = 1`` elsewhere) under which the network's function is
    unchanged when every node feature of ``i`` is multiplied by ``q_i`` and every edge
    ``j → i`` by ``q_i / q_j``: the group's ``action`` is kept only where that is the
    whole action. That is, the group (not indexed by another) is the single factor of
    its sets' axes; every tensor it acts on is a weight into or out of those sets (on
    that axis) or a bias or probe feature on them; and no identity edge (a residual
    add) touches them. Norm-scaled channels, residual streams, heads and
    concatenations keep their permutations only. ``to_graph`` stores the result per
    node as ``node_action``."""
    out: dict[str, int] = {}
    identity_sets = {s for pair in space.identities for s in pair}
    for g in space.groups.values():
        code = _ACTION_CODES.get(g.action or "")
        if code is None or g.within is not None:
            continue
        sets = {s.name for s in space.neuron_sets.values() if _is_simple(s.axis, g.name)}
        if not sets or sets & identity_sets:
            continue
        ok = True
        for name in space.tensors_of(g.name):
            t = space.tensors[name]
            on = {i for i, a in enumerate(t.axes) if g.name in a.groups}
            ends = set()
            if t.out_set in sets:
                ends.add(t.out_axis)
            if t.is_edge and t.in_set in sets:
                ends.add(t.in_axis)
            simple = all(_is_simple(t.axes[i], g.name) for i in ends)
            if not is_feature(t) or on != ends or not simple:
                ok = False
            elif not t.is_edge and (not _on_nodes(t) or t.role not in _SCALED_NODE_ROLES):
                ok = False
            if not ok:
                break
        if ok:
            out.update(dict.fromkeys(sets, code))
    return out


def random_node_scales(
    graph: Data, generator: torch.Generator | None = None, spread: float = 2.0
) -> Tensor:
    """A random factor per node of ``graph`` allowed by its ``node_action``: ``±1`` (sign),
    ``exp(U(-log spread, log spread))`` (positive scale), ``1`` (none); ``(N,)``."""
    a = graph.node_action
    n = a.shape[0]
    signs = torch.randint(0, 2, (n,), generator=generator).to(graph.x.dtype) * 2 - 1
    logs = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.log(spread)
    q = torch.ones(n, dtype=graph.x.dtype)
    q = torch.where(a == ACTION_SIGN, signs, q)
    return torch.where(a == ACTION_SCALE, logs.exp().to(q.dtype), q)


def scale_nodes(graph: Data, q: Tensor) -> Data:
    """``graph`` with neuron ``i`` scaled by ``q[i]``: its node features times ``q_i``,
    every edge ``j → i`` times ``q_i / q_j`` (identity edges and ``rest`` unchanged). For
    factors :func:`random_node_scales` draws, the weights :func:`to_weights` reads back
    compute the same function (the sign and positive-scale symmetries)."""
    out = graph.clone()
    src, dst = graph.edge_index
    q = q.to(graph.x.dtype)
    out.x = graph.x * q.unsqueeze(-1)
    ratio = (q[dst] / q[src]).unsqueeze(-1)
    keep = (graph.edge_type() == BLOCK_IDENTITY).unsqueeze(-1)
    out.edge_attr = torch.where(keep, graph.edge_attr, graph.edge_attr * ratio)
    return out


def _common_dtype(space: WeightSpace, weights: Mapping[str, Tensor]) -> torch.dtype:
    dtype = torch.float32
    for name in space.tensors:
        d = weights[name].dtype
        if d.is_floating_point and torch.finfo(d).bits > torch.finfo(dtype).bits:
            dtype = d
    return dtype


def _tap_positions(t: TensorSpec, chunks: int, width: int) -> Tensor:
    """Offsets of each kernel tap from the kernel centre, chunk by chunk: ``(chunks,
    width, 3)`` (zeros beyond the last tap and for kernels of more than 3 axes)."""
    pos = torch.zeros(chunks * width, 3)
    shape = t.tap_shape
    if shape and len(shape) <= 3:
        coords = torch.stack(torch.unravel_index(torch.arange(math.prod(shape)), shape), dim=1)
        centre = (torch.tensor(shape) - 1) / 2
        pos[: coords.shape[0], : len(shape)] = coords - centre
    return pos.view(chunks, width, 3)


def _fixed_position(space: WeightSpace, axis) -> Tensor:
    """Per index of a neuron-set axis: its row-major index along fixed factors, else -1."""
    parts = []
    offset = 0
    for seg in axis.segments:
        sizes = tuple(f.size for f in seg)
        n = math.prod(sizes)
        fixed = [j for j, f in enumerate(seg) if f.group is None]
        if not fixed:
            parts.append(torch.full((n,), -1, dtype=torch.long))
        else:
            coords = torch.unravel_index(torch.arange(n), sizes)
            pos = torch.zeros(n, dtype=torch.long)
            for j in fixed:
                pos = pos * sizes[j] + coords[j]
            # segments of a concatenation are told apart by their offset
            parts.append(pos + offset)
        offset += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class _Skeleton:
    """What a space's graph holds besides the weight values: the same for every weights of
    that space (and ``node_dim``, ``edge_dim``)."""

    layout: GraphLayout
    node_type: Tensor
    node_layer: Tensor
    node_pos: Tensor
    node_action: Tensor
    edge_index: Tensor
    block_type: Tensor
    block_taps: Tensor
    block_size: Tensor
    tap_pos: Tensor


# skeletons of small graphs, per live space (by id; dropped when the space is collected):
# a dataset's to_graph calls rebuild the same structure for every sample otherwise
_SKELETONS: dict[int, dict[tuple, _Skeleton]] = {}
_CACHED_EDGES = 1 << 16  # at most ~1.5 MB a skeleton: datasets of small networks gain, and
# a large graph's build keeps its peak memory (its structure costs little beside its values)


def _skeleton(
    space: WeightSpace, node_dim: int | None, edge_dim: int | None
) -> tuple[_Skeleton, bool]:
    """The structure of ``space``'s graphs, and whether it is kept (then shared: copy it)."""
    key = (node_dim, edge_dim, torch.get_default_device())
    known = _SKELETONS.get(id(space))
    if known is not None and key in known:
        return known[key], True
    layout = GraphLayout.of(space, node_dim, edge_dim)
    sets = space.neuron_sets
    width = layout.edge_dim
    node_type = torch.empty(layout.num_nodes, dtype=torch.long)
    node_layer = torch.empty(layout.num_nodes, dtype=torch.long)
    node_pos = torch.empty(layout.num_nodes, dtype=torch.long)
    node_action = torch.zeros(layout.num_nodes, dtype=torch.long)
    actions = node_actions(space)
    for s in sets.values():
        lo, hi = layout.set_offset[s.name], layout.set_offset[s.name] + s.axis.size
        node_type[lo:hi] = NODE_TYPES.get(s.kind, NODE_TYPES["hidden"])
        node_layer[lo:hi] = s.layer
        node_pos[lo:hi] = _fixed_position(space, s.axis)
        node_action[lo:hi] = actions.get(s.name, ACTION_NONE)

    edge_index = torch.empty(2, layout.num_edges, dtype=torch.long)
    n_blocks = layout.num_blocks
    block_type = torch.empty(n_blocks, dtype=torch.long)
    block_taps = torch.empty(n_blocks, dtype=torch.long)
    block_size = torch.empty(n_blocks, dtype=torch.long)
    tap_pos = torch.zeros(n_blocks, width, 3)
    b = 0
    for t in space.tensors.values():
        if t.name not in layout.edge_offset:
            continue
        n_out, n_in = sets[t.out_set].axis.size, sets[t.in_set].axis.size
        taps, chunks = math.prod(t.tap_shape), layout.edge_chunks[t.name]
        lo = layout.edge_offset[t.name]
        hi = lo + chunks * n_out * n_in
        out_ids = torch.arange(n_out) + layout.set_offset[t.out_set]
        in_ids = torch.arange(n_in) + layout.set_offset[t.in_set]
        shape = (chunks, n_out, n_in)
        edge_index[0, lo:hi].view(shape).copy_(in_ids.expand(shape))
        edge_index[1, lo:hi].view(shape).copy_(out_ids[:, None].expand(shape))
        rng = slice(b, b + chunks)
        block_size[rng] = n_out * n_in
        block_type[rng] = BLOCK_KERNEL if t.tap_shape else BLOCK_DENSE
        block_taps[rng] = (taps - torch.arange(chunks) * width).clamp(max=width)
        tap_pos[rng] = _tap_positions(t, chunks, width)
        b += chunks
    for (src, dst), lo in zip(space.identities, layout.identity_offset):
        n = sets[src].axis.size
        edge_index[0, lo : lo + n] = torch.arange(n) + layout.set_offset[src]
        edge_index[1, lo : lo + n] = torch.arange(n) + layout.set_offset[dst]
        block_type[b], block_taps[b], block_size[b] = BLOCK_IDENTITY, 1, n
        b += 1
    skeleton = _Skeleton(
        layout, node_type, node_layer, node_pos, node_action, edge_index, block_type,
        block_taps, block_size, tap_pos,
    )  # fmt: skip
    if layout.num_edges <= _CACHED_EDGES and type(edge_index) is Tensor:  # not a fake tensor
        if known is None:
            known = _SKELETONS[id(space)] = {}
            weakref.finalize(space, _SKELETONS.pop, id(space), None)
        known[key] = skeleton
        return skeleton, True
    return skeleton, False


def to_graph(
    space: WeightSpace,
    weights: Mapping[str, Tensor],
    node_dim: int | None = None,
    edge_dim: int | None = None,
) -> ParamGraph:
    """The parameter graph of ``weights`` (see the module docstring for its attributes).

    Args:
        space: the weight space; every tensor in it must be in ``weights``.
        weights: a state dict.
        node_dim: pad node features to this width (to batch different architectures).
        edge_dim: taps per edge ``T`` (to batch different architectures): kernels of more
            taps are cut into chunks of ``T``, smaller ones zero-padded. Default: the tap
            count that makes the graph smallest (see the module docstring).

    The structure (everything but ``x``, ``edge_attr``, ``rest`` and ``rest_int``) depends
    on the space alone; for graphs of up to 2^16 edges it is built once per space and
    copied into each graph after that.
    """
    space.validate(weights, strict=False)
    sk, shared = _skeleton(space, node_dim, edge_dim)
    layout = sk.layout
    dtype = _common_dtype(space, weights)
    sets = space.neuron_sets
    width = layout.edge_dim

    x = torch.zeros(layout.num_nodes, layout.node_dim, dtype=dtype)
    edge_attr = torch.empty(layout.num_edges, width, dtype=dtype)
    rest = torch.empty(layout.rest_size, dtype=dtype)
    rest_int = torch.empty(layout.rest_int_size, dtype=torch.long)
    for t in space.tensors.values():
        w = weights[t.name]
        if t.name in layout.rest_int_offset:
            lo = layout.rest_int_offset[t.name]
            rest_int[lo : lo + w.numel()] = w.reshape(-1)
        elif t.is_edge:
            n_out, n_in = sets[t.out_set].axis.size, sets[t.in_set].axis.size
            taps, chunks = math.prod(t.tap_shape), layout.edge_chunks[t.name]
            lo = layout.edge_offset[t.name]
            hi = lo + chunks * n_out * n_in
            block = w.movedim((t.out_axis, t.in_axis), (0, 1)).reshape(n_out * n_in, taps)
            # chunk j holds taps [j T, (j + 1) T) of every pair: (chunks, pairs, T)
            dst = edge_attr[lo:hi].view(chunks, n_out * n_in, width)
            full = taps // width
            if full:
                dst[:full].copy_(block[:, : full * width].view(-1, full, width).transpose(0, 1))
            if full < chunks:
                dst[full, :, : taps - full * width].copy_(block[:, full * width :])
                dst[full, :, taps - full * width :].zero_()
        elif _on_nodes(t):
            col, k = layout.node_columns[t.name]
            lo = layout.set_offset[t.out_set]
            n = sets[t.out_set].axis.size
            x[lo : lo + n, col : col + k] = w.movedim(t.out_axis, 0).reshape(n, k)
        else:
            lo = layout.rest_offset[t.name]
            rest[lo : lo + w.numel()] = w.reshape(-1)
    for (src, _), lo in zip(space.identities, layout.identity_offset):
        n = sets[src].axis.size
        edge_attr[lo : lo + n].zero_()
        edge_attr[lo : lo + n, 0] = 1

    # a kept structure is copied: a graph is the caller's to change in place
    own = Tensor.clone if shared else (lambda t: t)
    return ParamGraph(
        x=x,
        edge_index=own(sk.edge_index),
        edge_attr=edge_attr,
        block_type=own(sk.block_type),
        block_size=own(sk.block_size),
        block_taps=own(sk.block_taps),
        tap_pos=own(sk.tap_pos),
        node_type=own(sk.node_type),
        node_layer=own(sk.node_layer),
        node_pos=own(sk.node_pos),
        node_action=own(sk.node_action),
        rest=rest,
        rest_int=rest_int,
        num_nodes=layout.num_nodes,
    )


def to_weights(space: WeightSpace, graph: Data) -> dict[str, Tensor]:
    """Read the weights back from a graph built by :func:`to_graph` (exact inverse).

    Only ``x``, ``edge_attr``, ``rest`` and ``rest_int`` are read, so a graph whose
    features were replaced by a metanetwork's equivariant output maps back the same way.
    Tensors are returned in the dtype the space records.
    """
    layout = GraphLayout.of(space, graph.x.shape[1], graph.edge_attr.shape[1])
    if graph.x.shape[0] != layout.num_nodes or graph.edge_attr.shape[0] != layout.num_edges:
        raise WeightSpaceError(
            f"graph has {graph.x.shape[0]} nodes and {graph.edge_attr.shape[0]} edges, the "
            f"space needs {layout.num_nodes} and {layout.num_edges}: wrong space, or a batch "
            "(unbatch with Batch.to_data_list() first)"
        )
    sets = space.neuron_sets
    width = layout.edge_dim
    out: dict[str, Tensor] = {}
    for t in space.tensors.values():
        dtype = _torch_dtype(t.dtype)
        if t.name in layout.rest_int_offset:
            lo = layout.rest_int_offset[t.name]
            w = graph.rest_int[lo : lo + math.prod(t.shape)].reshape(t.shape)
        elif t.is_edge:
            n_out, n_in = sets[t.out_set].axis.size, sets[t.in_set].axis.size
            taps, chunks = math.prod(t.tap_shape), layout.edge_chunks[t.name]
            lo = layout.edge_offset[t.name]
            block = graph.edge_attr[lo : lo + chunks * n_out * n_in].view(
                chunks, n_out * n_in, width
            )
            if chunks > 1:
                block = block.transpose(0, 1).reshape(n_out * n_in, chunks * width)
            block = block.reshape(n_out * n_in, -1)[:, :taps]
            moved = [t.shape[t.out_axis], t.shape[t.in_axis]] + list(t.tap_shape)
            w = block.reshape(moved).movedim((0, 1), (t.out_axis, t.in_axis))
        elif _on_nodes(t):
            col, k = layout.node_columns[t.name]
            lo = layout.set_offset[t.out_set]
            n = sets[t.out_set].axis.size
            moved = [n] + [s for i, s in enumerate(t.shape) if i != t.out_axis]
            w = graph.x[lo : lo + n, col : col + k].reshape(moved).movedim(0, t.out_axis)
        else:
            lo = layout.rest_offset[t.name]
            w = graph.rest[lo : lo + math.prod(t.shape)].reshape(t.shape)
        out[t.name] = w.to(dtype).contiguous()
    return out


def node_permutation(space: WeightSpace, element: Mapping[str, Tensor]) -> Tensor:
    """Node relabelling of a group element: node ``i`` of the graph of ``apply(w, g)`` is
    node ``perm[i]`` of the graph of ``w``."""
    parts = []
    offset = 0
    for s in space.neuron_sets.values():
        parts.append(space.set_index(s.name, element) + offset)
        offset += s.axis.size
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class GraphGather:
    """:func:`to_graph` and :func:`to_weights` for batches of weight *features*, by indexing.

    Every network of one space has the same graph structure, so a batch of ``B`` networks
    with ``C`` feature channels per parameter is one template graph whose ``x`` and
    ``edge_attr`` are gathered from the flat features in one op (``C`` channels side by
    side: node features ``(C * node_dim)``, channel-major), and outputs are read back by
    the same positions. Padding and identity (residual) edges keep the template's values
    in every channel; tensors the graph does not hold (``rest``) read back as zeros.

    Shapes: :meth:`graph` takes ``{name: (B, C, *shape)}`` and returns a PyG ``Batch`` of
    ``B`` graphs; :meth:`weights` takes ``(B * N, node_dim)`` and ``(B * E, edge_dim)``
    and returns ``{name: (B, *shape)}``.
    """

    def __init__(
        self, space: WeightSpace, node_dim: int | None = None, edge_dim: int | None = None
    ):
        self.space, self.names = space, list(space.tensors)
        self.sizes = [math.prod(space.tensors[n].shape) for n in self.names]
        positions = torch.arange(1, sum(self.sizes) + 1, dtype=torch.float64)  # 0: no weight
        index = {
            n: p.reshape(space.tensors[n].shape)
            for n, p in zip(self.names, positions.split(self.sizes))
        }
        g = to_graph(space, index, node_dim, edge_dim)
        identity = g.edge_type() == BLOCK_IDENTITY
        g.edge_attr[identity] = 0
        slots = torch.cat([g.x.reshape(-1), g.edge_attr.reshape(-1)]).round().long()
        template = to_graph(
            space, {n: torch.zeros(s.shape) for n, s in space.tensors.items()}, node_dim, edge_dim
        )
        self.template = template
        self.num_nodes, self.num_edges = template.x.shape[0], template.edge_attr.shape[0]
        self.node_dim, self.edge_dim = template.x.shape[1], template.edge_attr.shape[1]
        self._slots = slots
        self._base = torch.cat([template.x.reshape(-1), template.edge_attr.reshape(-1)])
        # weight position -> slot in [x.flatten(), edge_attr.flatten()] (-1: not on the graph)
        back = torch.full((sum(self.sizes) + 1,), -1, dtype=torch.long)
        held = slots > 0
        back[slots[held]] = torch.nonzero(held).squeeze(1)
        self._back = back[1:]
        self._batches: dict[int, object] = {}

    def graph(self, features: Mapping[str, Tensor]):
        """The batched parameter graphs of ``{name: (B, C, *shape)}``."""
        from torch_geometric.data import Batch

        first = next(iter(features.values()))
        b, c = first.shape[:2]
        flat = torch.cat(
            [first.new_zeros(b, c, 1)] + [features[n].reshape(b, c, -1) for n in self.names],
            dim=2,
        )
        vals = torch.where(self._slots > 0, flat[:, :, self._slots], self._base.to(flat))
        nx = self.num_nodes * self.node_dim
        x = vals[:, :, :nx].reshape(b, c, self.num_nodes, self.node_dim)
        e = vals[:, :, nx:].reshape(b, c, self.num_edges, self.edge_dim)
        if b not in self._batches:
            self._batches[b] = Batch.from_data_list([self.template] * b)
        graph = self._batches[b].clone()
        graph.x = x.permute(0, 2, 1, 3).reshape(b * self.num_nodes, c * self.node_dim)
        graph.edge_attr = e.permute(0, 2, 1, 3).reshape(b * self.num_edges, c * self.edge_dim)
        return graph

    def weights(self, node: Tensor, edge: Tensor) -> dict[str, Tensor]:
        """Per-node ``(B * N, node_dim)`` and per-edge ``(B * E, edge_dim)`` values back as
        ``{name: (B, *shape)}`` (zeros for tensors not on the graph)."""
        b = node.shape[0] // self.num_nodes
        flat = torch.cat([node.reshape(b, -1), edge.reshape(b, -1), node.new_zeros(b, 1)], dim=1)
        out = flat[:, self._back]  # -1 reads the zero column
        return {
            n: t.reshape(b, *self.space.tensors[n].shape)
            for n, t in zip(self.names, out.split(self.sizes, dim=1))
        }
