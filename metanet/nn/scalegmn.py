r"""Scale- and sign-equivariant graph metanetworks (ScaleGMN style).

Kalogeropoulos et al., "Scale Equivariant Graph MetaNetworks" (NeurIPS 2024): besides
permuting hidden neurons, an odd activation (``tanh``, ``sin``) lets a neuron be negated
and a positively homogeneous one (ReLU) lets it be scaled by any ``q > 0``, its incoming
weights and bias multiplied by ``q`` and its outgoing weights divided by it. GMN and the
graph transformer see those copies of one network as different inputs; these layers map
them to correspondingly transformed outputs, and the readout to the same output.

The action is read from the graph, per node (``graph.node_action``, from the space's
group annotations by :func:`metanet.graph.node_actions`): neuron ``i`` carries ``q_i``
(``±1``, ``> 0``, or ``1`` where there is no action), its node features become
``q_i x_i`` and every edge ``j → i`` becomes ``q_i e_{ji} / q_j``. Every node state here
transforms as ``h_i → q_i h_i``:

.. math::

    h^0_i &= (W_x x_i) \odot c_i \quad (q_i \ne 1), \qquad
        h^0_i = \operatorname{MLP}(\gamma(x_i)) + c_i \quad (\text{no action}) \\
    E_{ji} &= (W_e e_{ji}) \odot b_{ji} \\
    m^{\to}_i &= \operatorname{mean}_{j \to i}\ E_{ji} \odot A h_j, \qquad
    m^{\leftarrow}_j = \operatorname{mean}_{j \to i}\ E_{ji} \odot B h_i \\
    h'_i &= h_i + f_{a_i}\big([h_i, m^{\to}_i, m^{\leftarrow}_i]\big)

with ``c_i`` an embedding of the node's type, depth and fixed position, ``b_{ji}`` one of
the edge's block type and tap positions, and ``W_x, W_e, A, B`` linear maps without bias
(they commute with a scalar ``q``). ``E_{ji} \odot A h_j`` transforms as ``q_i``, so the
forward messages do too. A backward message ``E_{ji} \odot B h_i`` transforms as
``q_i^2 / q_j``, which is ``q_j`` only when neither end scales positively (``q^2 = 1``):
it is sent only then.
The update ``f_a`` depends on the node's action ``a``:

* no action: an MLP;
* sign: :math:`f(u) = (\Gamma u) \odot (\rho(u) + \rho(-u))`, linear times sign-invariant;
* positive scale: :math:`f(u) = (\Gamma u) \odot \rho(u / \|u\|)`, linear times
  scale-invariant.

The readout pools per node the invariant of its state (``h``; ``ρ(h) + ρ(-h)``;
``ρ(h / ‖h‖)``) by mean and max over the graph and mean per node kind, then an MLP head:
invariant to permutations and to every ``q``. Node states are not normalized by a
LayerNorm (it is neither sign- nor scale-equivariant); states of nodes without an action
are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from metanet.graph import ACTION_NONE, ACTION_SCALE, ACTION_SIGN
from metanet.nn.gmn import NODE_KINDS, FourierEncoding, _num_graphs, tap_ends

__all__ = ["ScaleGMN", "ScaleGMNLayer", "ScaleEquivariant"]


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


def _actions(graph, n: int, device) -> Tensor:
    a = getattr(graph, "node_action", None)
    return a if a is not None else torch.zeros(n, dtype=torch.long, device=device)


def _unit(u: Tensor) -> Tensor:
    """``u / ‖u‖`` per row (0 for a zero row): invariant to a positive factor."""
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-30)


class ScaleEquivariant(nn.Module):
    """``u (N, d_in) -> (N, d_out)``, per row by its action ``a``: an MLP (no action),
    ``Γu ⊙ (ρ(u) + ρ(-u))`` (sign) or ``Γu ⊙ ρ(u/‖u‖)`` (positive scale), so that
    ``f(q u) = q f(u)`` for the ``q`` each action allows. ``invariant=True`` returns the
    invariant part instead: ``MLP(u)``, ``ρ(u) + ρ(-u)``, ``ρ(u/‖u‖)``."""

    def __init__(self, d_in: int, d_out: int, hidden: int, invariant: bool = False):
        super().__init__()
        self.invariant = invariant
        self.plain = _mlp(d_in, hidden, d_out)
        self.rho_sign = _mlp(d_in, hidden, d_out)
        self.rho_scale = _mlp(d_in, hidden, d_out)
        if not invariant:
            self.gamma_sign = nn.Linear(d_in, d_out, bias=False)
            self.gamma_scale = nn.Linear(d_in, d_out, bias=False)

    def forward(self, u: Tensor, action: Tensor) -> Tensor:
        a = action.unsqueeze(-1)
        sign = self.rho_sign(u) + self.rho_sign(-u)
        scale = self.rho_scale(_unit(u))
        if not self.invariant:
            sign = self.gamma_sign(u) * sign
            scale = self.gamma_scale(u) * scale
        out = torch.where(a == ACTION_SIGN, sign, self.plain(u))
        return torch.where(a == ACTION_SCALE, scale, out)


class ScaleGMNLayer(nn.Module):
    """One block: forward (and, where the actions allow, backward) messages ``E ⊙ A h``,
    then :class:`ScaleEquivariant` update with a residual. Shapes: ``h (N, hidden)``,
    ``edge (E, hidden)``, ``edge_index (2, E)``, ``action (N,)``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fwd = nn.Linear(hidden, hidden, bias=False)
        self.bwd = nn.Linear(hidden, hidden, bias=False)
        self.update = ScaleEquivariant(3 * hidden, hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: Tensor, edge_index: Tensor, edge: Tensor, action: Tensor) -> Tensor:
        src, dst = edge_index
        n = h.shape[0]
        m_fwd = edge * self.fwd(h).index_select(0, src)
        fwd = scatter(m_fwd, dst, 0, dim_size=n, reduce="mean")
        # backward along j -> i into j: q_i^2 / q_j is q_j only when neither end scales
        ok = ((action[src] != ACTION_SCALE) & (action[dst] != ACTION_SCALE)).unsqueeze(-1)
        m_bwd = edge * self.bwd(h).index_select(0, dst) * ok
        total = h.new_zeros(n, h.shape[1]).index_add_(0, src, m_bwd)
        count = h.new_zeros(n).index_add_(0, src, ok.squeeze(-1).to(h.dtype))
        bwd = total / count.clamp(min=1).unsqueeze(-1)
        h = h + self.update(torch.cat([h, fwd, bwd], dim=-1), action)
        return torch.where((action == ACTION_NONE).unsqueeze(-1), self.norm(h), h)


class ScaleGMN(nn.Module):
    """An invariant graph metanetwork over :class:`~metanet.ParamGraph` batches whose
    layers are equivariant to the permutations and to the sign and positive-scale actions
    of the graph's ``node_action`` (see the module docstring).

    Args:
        node_dim, edge_dim: widths of ``graph.x`` and ``graph.edge_attr``.
        hidden: width of the node and edge states.
        layers: number of :class:`ScaleGMNLayer` blocks (forward messages need as many
            as the network has weight layers to carry the inputs' side to the outputs).
        out_features: width of the output.
        head: width of the readout MLP (default ``hidden``).
        frequencies: Fourier encoding of the features of nodes without an action (the
            others are read linearly: a sinusoid of ``q x`` is not ``q`` times one).
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        hidden: int = 32,
        layers: int = 3,
        out_features: int = 1,
        head: int | None = None,
        frequencies: int = 4,
        max_layer: int = 128,
        max_position: int = 1024,
    ):
        super().__init__()
        self.max_layer, self.max_position = max_layer, max_position
        self.encode = FourierEncoding(frequencies)
        self.node_plain = nn.Linear(self.encode.out_features(node_dim), hidden)
        self.node_lin = nn.Linear(node_dim, hidden, bias=False)
        self.edge_lin = nn.Linear(edge_dim, hidden, bias=False)
        self.node_type = nn.Embedding(NODE_KINDS, hidden)
        self.layer_emb = nn.Embedding(max_layer + 1, hidden)
        self.pos_emb = nn.Embedding(max_position + 1, hidden)
        self.gate = nn.Embedding(max_layer + 1, hidden)  # per-depth gain of scaled nodes
        nn.init.ones_(self.gate.weight)
        self.edge_type = nn.Embedding(3, hidden)
        nn.init.ones_(self.edge_type.weight)
        self.tap_code = nn.Linear(6, hidden, bias=False)
        self.blocks = nn.ModuleList([ScaleGMNLayer(hidden) for _ in range(layers)])
        self.invariant = ScaleEquivariant(hidden, hidden, hidden, invariant=True)
        self.readout = _mlp((2 + NODE_KINDS) * hidden, head or hidden, out_features)

    def forward(self, graph) -> Tensor:
        x = graph.x
        action = _actions(graph, x.shape[0], x.device)
        layer = graph.node_layer.clamp(0, self.max_layer)
        kind = graph.node_type.clamp(0, NODE_KINDS - 1)
        plain = self.node_plain(self.encode(x)) + self.node_type(kind) + self.layer_emb(layer)
        plain = plain + self.pos_emb((graph.node_pos + 1).clamp(0, self.max_position))
        scaled = self.node_lin(x) * self.gate(layer)
        h = torch.where((action == ACTION_NONE).unsqueeze(-1), plain, scaled)
        code = self.edge_type(graph.block_type) + self.tap_code(tap_ends(graph).to(x.dtype))
        edge = self.edge_lin(graph.edge_attr) * code.repeat_interleave(graph.block_size, dim=0)
        for block in self.blocks:
            h = block(h, graph.edge_index, edge, action)
        batch = (
            graph.batch
            if getattr(graph, "batch", None) is not None
            else x.new_zeros(x.shape[0], dtype=torch.long)
        )
        n_graphs = _num_graphs(graph, batch)
        r = self.invariant(h, action)
        group = batch * NODE_KINDS + kind
        by_kind = scatter(r, group, 0, dim_size=n_graphs * NODE_KINDS, reduce="mean")
        parts = [
            scatter(r, batch, 0, dim_size=n_graphs, reduce="mean"),
            scatter(r, batch, 0, dim_size=n_graphs, reduce="max"),
            by_kind.reshape(n_graphs, -1),
        ]
        return self.readout(torch.cat(parts, dim=-1))
