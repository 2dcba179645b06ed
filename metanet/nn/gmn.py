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
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

__all__ = ["GMN", "GMNLayer", "FourierEncoding"]


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


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


class GMNLayer(MessagePassing):
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
        super().__init__(aggr="mean")
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
        h = x.shape[-1]
        e1, f1, b1 = self.edge_mlp[0], self.msg_fwd[0], self.msg_bwd[0]
        pre = torch.addmm(e1.bias, e, e1.weight[:, 2 * h :].t())
        pre = pre.add_(self._gather(x, e1.weight[:, :h], src))
        pre = pre.add_(self._gather(x, e1.weight[:, h : 2 * h], dst))
        e = self.norm_e(e + self.edge_mlp[2](self.edge_mlp[1](pre)))
        m_fwd = torch.addmm(f1.bias, e, f1.weight[:, h:].t())
        m_fwd = m_fwd.add_(self._gather(x, f1.weight[:, :h], src))
        m_bwd = torch.addmm(b1.bias, e, b1.weight[:, h:].t())
        m_bwd = m_bwd.add_(self._gather(x, b1.weight[:, :h], dst))
        fwd = self._mean_then(self.msg_fwd, m_fwd, dst, x.shape[0])
        bwd = self._mean_then(self.msg_bwd, m_bwd, src, x.shape[0])
        x = self.norm_x(x + self.node_mlp(torch.cat([x, fwd, bwd], dim=-1)))
        return x, e

    @staticmethod
    def _gather(x: Tensor, weight: Tensor, index: Tensor) -> Tensor:
        """``x[index] @ weight.T``, as ``(x @ weight.T)[index]``."""
        return (x @ weight.t()).index_select(0, index)

    @staticmethod
    def _mean_then(mlp: nn.Sequential, pre: Tensor, index: Tensor, n: int) -> Tensor:
        """Mean over ``index`` of ``mlp`` given its first Linear's output ``pre`` per edge
        (0 at a node no edge reaches)."""
        act = mlp[1](pre)
        total = act.new_zeros(n, act.shape[-1]).index_add_(0, index, act)
        count = torch.bincount(index, minlength=n).to(act.dtype).unsqueeze(-1)
        return mlp[2](total / count.clamp(min=1)) * (count > 0)


class GMN(nn.Module):
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

    Node inputs: Fourier-encoded features plus embeddings of node type, layer depth and
    (for fixed neurons: inputs, outputs) position; edge inputs: Fourier-encoded values plus
    an embedding of the edge type (dense weight, kernel, identity) and a linear code of the
    positions of the first and last tap the edge holds (``graph.tap_pos``: a kernel cut
    into chunks of ``edge_dim`` taps gives parallel edges, told apart by it; zero for
    dense weights). Both are computed per block and repeated over its edges.
    """

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
    ):
        super().__init__()
        self.node_dim, self.edge_dim, self.equivariant = node_dim, edge_dim, equivariant
        self.max_layer, self.max_position = max_layer, max_position
        self.encode = FourierEncoding(frequencies)
        self.node_in = nn.Linear(self.encode.out_features(node_dim), hidden)
        self.edge_in = nn.Linear(self.encode.out_features(edge_dim), hidden)
        self.node_type = nn.Embedding(4, hidden)
        self.layer_emb = nn.Embedding(max_layer + 1, hidden)
        self.pos_emb = nn.Embedding(max_position + 1, hidden)  # 0: permutable neuron
        self.edge_type = nn.Embedding(3, hidden)
        self.tap_code = nn.Linear(6, hidden, bias=False)
        self.blocks = nn.ModuleList([GMNLayer(hidden) for _ in range(layers)])
        if equivariant:
            self.node_out = _mlp(hidden, hidden, node_dim)
            self.edge_out = _mlp(hidden, hidden, edge_dim)
        else:
            self.readout = _mlp(4 * hidden, hidden, out_features)

    def forward(self, graph) -> Tensor | tuple[Tensor, Tensor]:
        x = self.node_in(self.encode(graph.x))
        x = x + self.node_type(graph.node_type.clamp(0, 3))
        x = x + self.layer_emb(graph.node_layer.clamp(0, self.max_layer))
        x = x + self.pos_emb((graph.node_pos + 1).clamp(0, self.max_position))
        e = self.edge_in(self.encode(graph.edge_attr)) + self._block_code(graph)
        for block in self.blocks:
            x, e = block(x, graph.edge_index, e)
        if self.equivariant:
            return self.node_out(x), self.edge_out(e)
        batch = (
            graph.batch
            if getattr(graph, "batch", None) is not None
            else x.new_zeros(x.shape[0], dtype=torch.long)
        )
        n_graphs = int(batch.max()) + 1 if batch.numel() else 1
        edge_batch = batch[graph.edge_index[1]]
        pooled = torch.cat(
            [
                scatter(x, batch, 0, dim_size=n_graphs, reduce="mean"),
                scatter(x, batch, 0, dim_size=n_graphs, reduce="max"),
                scatter(e, edge_batch, 0, dim_size=n_graphs, reduce="mean"),
                scatter(e, edge_batch, 0, dim_size=n_graphs, reduce="max"),
            ],
            dim=-1,
        )
        return self.readout(pooled)

    def _block_code(self, graph) -> Tensor:
        """Per edge ``(E, hidden)``: its block's type embedding plus the code of its first
        and last tap position, computed per block ``(B, hidden)`` and repeated."""
        last = (graph.block_taps - 1).clamp(min=0)
        taps = torch.cat([graph.tap_pos[:, 0], graph.tap_pos[torch.arange(last.numel()), last]], 1)
        code = self.edge_type(graph.block_type) + self.tap_code(taps.to(self.tap_code.weight))
        return code.repeat_interleave(graph.block_size, dim=0)

    @staticmethod
    def as_graph(graph, node_out: Tensor, edge_out: Tensor):
        """A copy of ``graph`` whose ``x``/``edge_attr`` are the equivariant outputs."""
        out = graph.clone()
        out.x, out.edge_attr = node_out, edge_out
        return out
