"""A transformer over parameter-graph tokens (Neural Graph Transformer style).

Kofinas et al., "Graph Neural Networks for Learning Equivariant Representations of Neural
Networks" (ICLR 2024) read a network as a graph and run either message passing (NG-GNN) or
a relational transformer (NG-T) on it; NG-T leads on MNIST INRs. Here every neuron of a
:class:`~metanet.ParamGraph` is a token and every token attends to every other token of its
network; the weights enter as per-head attention biases of the pairs they connect (both
directions) and as values carried along them, and are updated from their end points, as
in GMN's edge update:

.. math::

    \\alpha_{ij} &= \\operatorname{softmax}_j\\Big(\\frac{q_i^\\top k_j}{\\sqrt{d}}
        + \\beta^{\\to}(e_{j \\to i}) + \\beta^{\\leftarrow}(e_{i \\to j})\\Big) \\\\
    x'_i &= x_i + W_o\\Big(\\sum_j \\alpha_{ij} v_j
        + \\sum_{j \\to i} \\alpha_{ij} U e_{j \\to i}\\Big),\\qquad
    x''_i = x'_i + \\operatorname{MLP}(x'_i) \\\\
    e'_{j \\to i} &= e_{j \\to i} + \\phi_e(x''_i, x''_j, e_{j \\to i})

(pre-norm residual blocks; :math:`\\beta` are linear maps of the edge state to one bias per
head, summed over parallel edges). Tokens carry no index, so relabelling neurons relabels
the outputs: the network is equivariant per node and edge and invariant after pooling, for
any architecture (fixed neurons are told apart by the position embedding, as in GMN).

Attention is dense within each graph: memory grows as ``graphs × heads × N_max²``, fine
for INRs and small CNN zoos (hundreds of neurons), not for ImageNet-size graphs (use GMN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter, to_dense_batch

from metanet.nn.gmn import GraphInputs, _num_graphs

__all__ = ["GraphTransformer", "GraphTransformerLayer"]


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


class GraphTransformerLayer(nn.Module):
    """One block: edge-biased attention over a graph's nodes, node MLP, edge update.

    Shapes: ``x (N, hidden)``, ``e (E, hidden)``, ``edge_index (2, E)``, ``batch (N,)``.
    """

    def __init__(self, hidden: int, heads: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.dim = heads, hidden // heads
        self.norm_x = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.bias_fwd = nn.Linear(hidden, heads)  # e_{j->i} as a bias of query i, key j
        self.bias_bwd = nn.Linear(hidden, heads)  # e_{i->j} as a bias of query i, key j
        self.edge_value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm_ff = nn.LayerNorm(hidden)
        self.ff = _mlp(hidden, 2 * hidden, hidden)
        self.norm_e = nn.LayerNorm(hidden)
        self.edge_mlp = _mlp(3 * hidden, hidden, hidden)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.LayerNorm):
                m.reset_parameters()

    def forward(
        self, x: Tensor, e: Tensor, edge_index: Tensor, batch: Tensor
    ) -> tuple[Tensor, Tensor]:
        src, dst = edge_index
        h = self.norm_x(x)
        dense, mask = to_dense_batch(h, batch)  # (G, M, hidden), (G, M)
        g, m, _ = dense.shape
        local = torch.arange(x.shape[0], device=x.device) - _first_index(batch, g)[batch]
        q, k, v = self.qkv(dense).reshape(g, m, 3, self.heads, self.dim).unbind(2)
        logits = torch.einsum("gihd,gjhd->ghij", q, k) / math.sqrt(self.dim)
        eb = batch[dst]
        he = self.norm_e(e)
        bias = logits.new_zeros(g, m, m, self.heads)  # (graph, query, key, head)
        bias.index_put_((eb, local[dst], local[src]), self.bias_fwd(he), accumulate=True)
        bias.index_put_((eb, local[src], local[dst]), self.bias_bwd(he), accumulate=True)
        logits = logits + bias.permute(0, 3, 1, 2)
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = logits.softmax(-1)  # (G, heads, M, M)
        y = torch.einsum("ghij,gjhd->gihd", att, v).reshape(g, m, -1)[mask]
        # values carried along the weights: sum over edges j -> i of alpha_ij U e_ji
        a_edge = att.permute(0, 2, 3, 1)[eb, local[dst], local[src]]  # (E, heads)
        ue = self.edge_value(he).reshape(-1, self.heads, self.dim) * a_edge[..., None]
        y = y + scatter(ue.reshape(len(e), -1), dst, 0, dim_size=x.shape[0], reduce="sum")
        x = x + self.out(y)
        x = x + self.ff(self.norm_ff(x))
        e = e + self.edge_mlp(torch.cat([x[dst], x[src], he], -1))
        return x, e


def _first_index(batch: Tensor, graphs: int) -> Tensor:
    """Index of each graph's first node (nodes of a graph are contiguous, as PyG's)."""
    counts = torch.bincount(batch, minlength=graphs)
    return torch.cumsum(counts, 0) - counts


class GraphTransformer(GraphInputs):
    """Transformer over :class:`~metanet.ParamGraph` batches (neurons as tokens).

    Args:
        node_dim: width of ``graph.x``; edge_dim: width of ``graph.edge_attr``.
        hidden: token and edge state width; heads: attention heads; layers: blocks.
        out_features: width of the invariant output (mean/max pooled nodes and edges).
        frequencies, max_layer, max_position: input encodings, GMN's own
            (:class:`~metanet.nn.gmn.GraphInputs`: kernel chunks told apart by their
            tap positions).
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        hidden: int = 64,
        layers: int = 3,
        out_features: int = 1,
        heads: int = 4,
        frequencies: int = 4,
        max_layer: int = 128,
        max_position: int = 1024,
    ):
        super().__init__()
        self._init_inputs(node_dim, edge_dim, hidden, frequencies, max_layer, max_position)
        self.blocks = nn.ModuleList(GraphTransformerLayer(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.readout = _mlp(4 * hidden, hidden, out_features)

    def forward(self, graph) -> Tensor:
        x = self.embed_nodes(graph)
        e = self.embed_edges(graph)
        batch = getattr(graph, "batch", None)
        if batch is None:
            batch = x.new_zeros(x.shape[0], dtype=torch.long)
        for block in self.blocks:
            x, e = block(x, e, graph.edge_index, batch)
        x = self.norm(x)
        n = _num_graphs(graph, batch)
        eb = batch[graph.edge_index[1]]
        pooled = torch.cat(
            [
                scatter(x, batch, 0, dim_size=n, reduce="mean"),
                scatter(x, batch, 0, dim_size=n, reduce="max"),
                scatter(e, eb, 0, dim_size=n, reduce="mean"),
                scatter(e, eb, 0, dim_size=n, reduce="max"),
            ],
            -1,
        )
        return self.readout(pooled)
