"""Graph metanetworks (GMN): message passing over parameter graphs.

Lim et al., "Graph Metanetworks for Processing Diverse Neural Architectures" (ICLR 2024).
The network's neurons are nodes and its weights are edges (:func:`metanet.to_graph`);
a permutation of hidden units relabels the nodes, so any message-passing network is
equivariant (per node/edge outputs) or invariant (pooled outputs) by construction, for
every architecture a :class:`~metanet.WeightSpace` describes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.utils import scatter

__all__ = ["GMN", "GMNLayer", "GraphInputs", "FourierEncoding"]

NODE_KINDS = 4  # graph.node_type: 0 input, 1 hidden, 2 output, 3 residual point


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each edge chunk allocates and frees the same large buffers; glibc raises its mmap
    threshold after the first free and serves the rest from the heap, where they
    fragment: the resident size then grows by ~100 bytes per edge per block although
    nothing is kept (measured on ShuffleNetV2: 640 MB at 100k-edge chunks, 20 MB with
    trimming)."""
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        try:
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            _TRIM = getattr(libc, "malloc_trim", False) or False
        except OSError:
            pass
    if _TRIM:
        _TRIM(0)


_TRIM = None  # the libc ``malloc_trim`` once looked up (False where there is none)


class FourierEncoding(nn.Module):
    r"""Raw weight values to ``[v, sin(2^k \pi v), cos(2^k \pi v)]`` for ``k < frequencies``.

    Weights span several orders of magnitude; the sinusoids give a metanetwork a
    resolution a single linear read of the value lacks.
    """

    def __init__(self, frequencies: int = 4):
        super().__init__()
        self.register_buffer("scales", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)

    def forward(self, v: Tensor) -> Tensor:
        z = v.unsqueeze(-1) * self.scales.to(v.dtype)
        return torch.cat([v, torch.sin(z).flatten(-2), torch.cos(z).flatten(-2)], dim=-1)

    def out_features(self, n: int) -> int:
        return n * (1 + 2 * self.scales.numel())


def _num_graphs(graph, batch: Tensor) -> int:
    """How many graphs a batch holds: PyG's count when it kept one (no host sync on a
    GPU), else from the batch vector."""
    n = getattr(graph, "num_graphs", None)
    if isinstance(n, int) and getattr(graph, "batch", None) is not None:
        return n
    return int(batch.max()) + 1 if batch.numel() else 1


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


def tap_ends(graph) -> Tensor:
    """Per block ``(B, 6)``: the positions of the first and last tap it holds."""
    last = (graph.block_taps - 1).clamp(min=0)
    return torch.cat([graph.tap_pos[:, 0], graph.tap_pos[torch.arange(last.numel()), last]], 1)


class GraphInputs(nn.Module):
    """The input embedding of the graph metanetworks (:class:`GMN`,
    :class:`~metanet.nn.GraphTransformer`): one definition, so that both tell the same
    things apart.

    Nodes: Fourier-encoded features plus embeddings of node type, layer depth and (for
    fixed neurons: inputs, outputs) position. Edges: Fourier-encoded values plus, per
    block, an embedding of its type (dense weight, kernel, identity) and a linear code of
    the positions of the first and last tap it holds (``graph.tap_pos``: a kernel cut into
    chunks of ``edge_dim`` taps gives parallel edges, told apart by it; zero for dense
    weights). Subclasses call :meth:`_init_inputs` in their ``__init__``."""

    def _init_inputs(
        self,
        node_dim: int,
        edge_dim: int,
        hidden: int,
        frequencies: int,
        max_layer: int,
        max_position: int,
    ) -> None:
        self.max_layer, self.max_position = max_layer, max_position
        self.encode = FourierEncoding(frequencies)
        self.node_in = nn.Linear(self.encode.out_features(node_dim), hidden)
        self.edge_in = nn.Linear(self.encode.out_features(edge_dim), hidden)
        self.node_type = nn.Embedding(NODE_KINDS, hidden)
        self.layer_emb = nn.Embedding(max_layer + 1, hidden)
        self.pos_emb = nn.Embedding(max_position + 1, hidden)  # 0: permutable neuron
        self.edge_type = nn.Embedding(3, hidden)
        self.tap_code = nn.Linear(6, hidden, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the embedding was shared (a GraphTransformer had no tap
        # code): a zero code is exactly the function they were trained as. Only such a
        # dict (it has the edge type embedding the tap code sits beside) is filled in; any
        # other reports its missing keys as usual, without this warning
        key = prefix + "tap_code.weight"
        if key not in state_dict and prefix + "edge_type.weight" in state_dict:
            import warnings

            warnings.warn(
                f"{type(self).__name__}: the state dict has no {key!r} (saved before the "
                "input embedding was shared); loading it as zeros, the function it was "
                "saved with",
                stacklevel=2,
            )
            state_dict[key] = torch.zeros_like(self.tap_code.weight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed_nodes(self, graph) -> Tensor:
        """``(N, hidden)``: the nodes' input states."""
        x = self.node_in(self.encode(graph.x))
        x = x + self.node_type(graph.node_type.clamp(0, NODE_KINDS - 1))
        x = x + self.layer_emb(graph.node_layer.clamp(0, self.max_layer))
        return x + self.pos_emb((graph.node_pos + 1).clamp(0, self.max_position))

    def block_codes(self, graph) -> Tensor:
        """Per block ``(B, hidden)``: its type embedding plus the code of its first and
        last tap position (each edge adds its block's)."""
        taps = tap_ends(graph).to(self.tap_code.weight)
        return self.edge_type(graph.block_type) + self.tap_code(taps)

    def embed_edges(self, graph, code: Tensor | None = None) -> Tensor:
        """``(E, hidden)``: every edge's input state (``code``: :meth:`block_codes`)."""
        code = self.block_codes(graph) if code is None else code
        e = self.edge_in(self.encode(graph.edge_attr))
        return e + code.repeat_interleave(graph.block_size, dim=0)


class GMNLayer(nn.Module):
    r"""One GMN block with edge and node updates.

    .. math::

        e'_{ij} &= e_{ij} + \phi_e(x_i, x_j, e_{ij}) \\
        x'_i &= x_i + \phi_x\Big(x_i,\ \operatorname{mean}_{j \to i} \phi_m(x_j, e'_{ji}),\
                \operatorname{mean}_{i \to k} \phi_m'(x_k, e'_{ik})\Big)

    Messages flow both ways along each weight (from its input neuron and from its output
    neuron), so information reaches every layer in both directions.

    Shapes: ``x (N, hidden)``, ``edge_index (2, E)``, ``e (E, hidden)``.
    """

    def __init__(self, hidden: int):
        super().__init__()  # the means are scatter_means: no MessagePassing machinery
        self.edge_mlp = _mlp(3 * hidden, hidden, hidden)
        self.msg_fwd = _mlp(2 * hidden, hidden, hidden)
        self.msg_bwd = _mlp(2 * hidden, hidden, hidden)
        self.node_mlp = _mlp(3 * hidden, hidden, hidden)
        self.norm_x = nn.LayerNorm(hidden)
        self.norm_e = nn.LayerNorm(hidden)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.LayerNorm):
                m.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        # The function of concatenating the inputs and running each MLP per edge, with
        # less per-edge work: the first Linear of an edge-wise MLP is split by input
        # block and its node blocks are applied per node, then gathered (N << E); the
        # second Linear of a message MLP is applied after the mean, with which it
        # commutes (a node no message reaches still gets 0). Same parameters; outputs
        # agree to float rounding.
        src, dst = edge_index
        e = self.edge_update(x, src, dst, e)
        fwd, bwd = self.message_sums(x, src, dst, e)
        n = x.shape[0]
        counts = (torch.bincount(dst, minlength=n), torch.bincount(src, minlength=n))
        return self.node_update(x, fwd, bwd, counts), e

    def edge_update(self, x: Tensor, src: Tensor, dst: Tensor, e: Tensor) -> Tensor:
        """``e'`` of the edges ``src → dst`` (any subset of the graph's edges)."""
        h = x.shape[-1]
        e1 = self.edge_mlp[0]
        pre = torch.addmm(e1.bias, e, e1.weight[:, 2 * h :].t())
        pre = pre.add_(self._gather(x, e1.weight[:, :h], src))
        pre = pre.add_(self._gather(x, e1.weight[:, h : 2 * h], dst))
        return self.norm_e(e + self.edge_mlp[2](self.edge_mlp[1](pre)))

    def message_sums(self, x: Tensor, src: Tensor, dst: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Per node ``(N, hidden)``: the sums of the hidden activations of the forward
        messages it receives and of the backward ones it sends, over the edges given
        (sums over disjoint edge subsets add up to the whole graph's)."""
        h, n = x.shape[-1], x.shape[0]
        f1, b1 = self.msg_fwd[0], self.msg_bwd[0]
        m_fwd = torch.addmm(f1.bias, e, f1.weight[:, h:].t())
        m_fwd = self.msg_fwd[1](m_fwd.add_(self._gather(x, f1.weight[:, :h], src)))
        m_bwd = torch.addmm(b1.bias, e, b1.weight[:, h:].t())
        m_bwd = self.msg_bwd[1](m_bwd.add_(self._gather(x, b1.weight[:, :h], dst)))
        fwd = m_fwd.new_zeros(n, h).index_add_(0, dst, m_fwd)
        bwd = m_bwd.new_zeros(n, h).index_add_(0, src, m_bwd)
        return fwd, bwd

    def node_update(
        self, x: Tensor, fwd: Tensor, bwd: Tensor, counts: tuple[Tensor, Tensor]
    ) -> Tensor:
        """``x'`` from :meth:`message_sums` over all edges and the per-node counts of
        incoming and outgoing edges."""
        fwd = self._mean_then(self.msg_fwd, fwd, counts[0])
        bwd = self._mean_then(self.msg_bwd, bwd, counts[1])
        return self.norm_x(x + self.node_mlp(torch.cat([x, fwd, bwd], dim=-1)))

    @staticmethod
    def _gather(x: Tensor, weight: Tensor, index: Tensor) -> Tensor:
        """``x[index] @ weight.T``, as ``(x @ weight.T)[index]``."""
        return (x @ weight.t()).index_select(0, index)

    @staticmethod
    def _mean_then(mlp: nn.Sequential, total: Tensor, count: Tensor) -> Tensor:
        """``mlp``'s second Linear of the mean activation (``total / count``); 0 at a node
        no edge reaches."""
        count = count.to(total.dtype).unsqueeze(-1)
        return mlp[2](total / count.clamp(min=1)) * (count > 0)


class GMN(GraphInputs):
    """Graph metanetwork over :class:`~metanet.ParamGraph` batches.

    Args:
        node_dim: width of ``graph.x`` (use the same ``node_dim`` in ``to_graph``).
        edge_dim: width of ``graph.edge_attr``.
        hidden: width of node and edge states.
        layers: number of :class:`GMNLayer` blocks.
        out_features: width of the invariant (graph-level) output.
        equivariant: if True, :meth:`forward` returns per-node ``(N, node_dim)`` and
            per-edge ``(E, edge_dim)`` outputs in the input's layout (map them back with
            :meth:`as_graph` and :func:`metanet.to_weights`) instead of the pooled output.
        max_layer, max_position: sizes of the layer-depth and fixed-neuron-position
            embeddings (larger values are clamped).

    Inputs: :class:`GraphInputs` (Fourier-encoded values; node type, depth and fixed
    position; each edge's block type and tap positions).

    Invariant readout: mean and max of the node and of the edge states, the mean node
    state of each node kind (input, hidden, output, residual point: a network's few
    output neurons would vanish in the all-node mean) and, with ``summary=S``, the mean
    and max per kind of an MLP (width ``S``) on the raw node inputs (not Fourier-encoded),
    a DeepSets summary beside the message passing (NG-GNN-style probe features reach the
    head directly); then an MLP of width ``head`` (default ``hidden``).

    Graphs of large networks (ViT-B/16: 87M edges per network) run edge-chunked: a graph
    with more than ``edge_chunk`` edges (default: as many as keep one chunk's
    intermediates near 256 MiB at this ``hidden``) is processed ``edge_chunk`` edges at a
    time, keeping only the node states of each block and the per-node message sums.
    The edge states are recomputed from the inputs inside each chunk (block ``l`` redoes
    the edge updates of blocks ``< l``) under activation checkpointing, so memory grows
    with the nodes, not the edges, at about ``1 + layers / 2`` times the edge work. Same
    function, same parameters; outputs agree with the one-pass forward to float rounding.
    """

    CHUNK_BYTES = 256 * 2**20
    BYTES_PER_EDGE_PER_HIDDEN = 4 * 24  # float32, the ~24 edge tensors a block's backward keeps

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        hidden: int = 64,
        layers: int = 3,
        out_features: int = 1,
        equivariant: bool = False,
        frequencies: int = 4,
        max_layer: int = 128,
        max_position: int = 1024,
        edge_chunk: int | None = None,
        summary: int = 0,
        head: int | None = None,
    ):
        super().__init__()
        self.node_dim, self.edge_dim, self.equivariant = node_dim, edge_dim, equivariant
        if edge_chunk is None:
            edge_chunk = max(4096, self.CHUNK_BYTES // (self.BYTES_PER_EDGE_PER_HIDDEN * hidden))
        if edge_chunk < 1:
            raise ValueError(
                f"GMN: edge_chunk must be a positive number of edges, got {edge_chunk}"
            )
        self.edge_chunk = int(edge_chunk)
        self._init_inputs(node_dim, edge_dim, hidden, frequencies, max_layer, max_position)
        self.blocks = nn.ModuleList([GMNLayer(hidden) for _ in range(layers)])
        if equivariant:
            self.node_out = _mlp(hidden, hidden, node_dim)
            self.edge_out = _mlp(hidden, hidden, edge_dim)
        else:
            width = (4 + NODE_KINDS) * hidden + 2 * NODE_KINDS * summary
            self.readout = _mlp(width, head or hidden, out_features)
        self.summary = _mlp(node_dim, summary, summary) if summary and not equivariant else None

    def forward(self, graph) -> Tensor | tuple[Tensor, Tensor]:
        x = self.embed_nodes(graph)
        code = self.block_codes(graph)
        batch = (
            graph.batch
            if getattr(graph, "batch", None) is not None
            else x.new_zeros(x.shape[0], dtype=torch.long)
        )
        n_graphs = _num_graphs(graph, batch)
        if graph.edge_index.shape[1] > self.edge_chunk:
            x, e_pool, edge_out = self._chunked(graph, x, code, batch, n_graphs)
            if self.equivariant:
                return self.node_out(x), edge_out
        else:
            e = self.embed_edges(graph, code)
            for block in self.blocks:
                x, e = block(x, graph.edge_index, e)
            if self.equivariant:
                return self.node_out(x), self.edge_out(e)
            edge_batch = batch[graph.edge_index[1]]
            e_pool = [
                scatter(e, edge_batch, 0, dim_size=n_graphs, reduce="mean"),
                scatter(e, edge_batch, 0, dim_size=n_graphs, reduce="max"),
            ]
        # Per graph and node kind, the mean of its nodes' states (0 for a kind it lacks):
        # the output neurons (an INR's pixel value, a classifier's logits) are a handful
        # among thousands and would vanish in the all-node mean. A permutation moves
        # nodes only within their kind, so this stays invariant.
        group = batch * NODE_KINDS + graph.node_type.clamp(0, NODE_KINDS - 1)
        by_kind = scatter(x, group, 0, dim_size=n_graphs * NODE_KINDS, reduce="mean")
        parts = [
            scatter(x, batch, 0, dim_size=n_graphs, reduce="mean"),
            scatter(x, batch, 0, dim_size=n_graphs, reduce="max"),
            *e_pool,
            by_kind.reshape(n_graphs, -1),
        ]
        if self.summary is not None:
            # DeepSets over each kind's node inputs (probe features: an INR's output neuron
            # carries the image at the probe points), beside the message passing. Raw
            # values, not Fourier-encoded: on digit INRs the encoded probes (sin(8 pi v) of
            # pixel values) let the summary memorize the training set (test 86.0 +- 1.8%
            # encoded vs 91.2 +- 1.5% raw, 3 seeds)
            s = self.summary(graph.x)
            for reduce in ("mean", "max"):
                per_kind = scatter(s, group, 0, dim_size=n_graphs * NODE_KINDS, reduce=reduce)
                parts.append(per_kind.reshape(n_graphs, -1))
        return self.readout(torch.cat(parts, dim=-1))

    def _chunked(self, graph, x: Tensor, code: Tensor, batch: Tensor, n_graphs: int):
        """The blocks, ``edge_chunk`` edges at a time (see the class docstring): the last
        node states, the pooled edge states ``[mean, max]`` per graph and (equivariant)
        the per-edge outputs."""
        edge_index = graph.edge_index
        n, n_edges = x.shape[0], edge_index.shape[1]
        counts = (
            torch.bincount(edge_index[1], minlength=n),
            torch.bincount(edge_index[0], minlength=n),
        )
        ends = torch.cumsum(graph.block_size, 0)
        spans = [
            (lo, min(lo + self.edge_chunk, n_edges)) for lo in range(0, n_edges, self.edge_chunk)
        ]
        xs = [x]
        e_sum = e_max = None
        edge_out = []
        for layer, block in enumerate(self.blocks):
            fwd = bwd = 0
            final = layer == len(self.blocks) - 1
            for lo, hi in spans:
                out = checkpoint(
                    self._chunk,
                    layer,
                    lo,
                    hi,
                    graph,
                    ends,
                    code,
                    batch,
                    n_graphs,
                    *xs,
                    use_reentrant=False,
                )
                fwd, bwd = fwd + out[0], bwd + out[1]
                if final and self.equivariant:
                    edge_out.append(out[2])
                elif final:
                    e_sum = out[2] if e_sum is None else e_sum + out[2]
                    e_max = out[3] if e_max is None else torch.maximum(e_max, out[3])
            xs.append(block.node_update(xs[-1], fwd, bwd, counts))
        if self.equivariant:
            return xs[-1], None, torch.cat(edge_out)
        per_graph = scatter(counts[0], batch, 0, dim_size=n_graphs, reduce="sum")
        mean = e_sum / per_graph.clamp(min=1).to(e_sum.dtype).unsqueeze(-1)
        e_max = torch.where(torch.isinf(e_max), torch.zeros_like(e_max), e_max)
        return xs[-1], [mean, e_max], None

    def _chunk(self, layer, lo, hi, graph, ends, code, batch, n_graphs, *xs):
        """Edges ``lo:hi`` through blocks ``0..layer``: block ``layer``'s message sums and,
        after the last block, the chunk's per-graph edge sum and max (or edge outputs)."""
        _release_freed_memory()
        src, dst = graph.edge_index[0, lo:hi], graph.edge_index[1, lo:hi]
        blocks = torch.searchsorted(ends, torch.arange(lo, hi, device=ends.device), right=True)
        e = self.edge_in(self.encode(graph.edge_attr[lo:hi])) + code[blocks]
        for k in range(layer + 1):
            e = self.blocks[k].edge_update(xs[k], src, dst, e)
        fwd, bwd = self.blocks[layer].message_sums(xs[layer], src, dst, e)
        if layer < len(self.blocks) - 1:
            return fwd, bwd
        if self.equivariant:
            return fwd, bwd, self.edge_out(e)
        edge_batch = batch[dst]
        e_sum = scatter(e, edge_batch, 0, dim_size=n_graphs, reduce="sum")
        e_max = scatter(e, edge_batch, 0, dim_size=n_graphs, reduce="max")
        present = torch.bincount(edge_batch, minlength=n_graphs).unsqueeze(-1) > 0
        return fwd, bwd, e_sum, torch.where(present, e_max, torch.full_like(e_max, -math.inf))

    @staticmethod
    def as_graph(graph, node_out: Tensor, edge_out: Tensor):
        """A copy of ``graph`` whose ``x``/``edge_attr`` are the equivariant outputs."""
        out = graph.clone()
        out.x, out.edge_attr = node_out, edge_out
        return out
