"""GMN and UNF on every architecture of the zoo: equivariant, invariant, and no more."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from converters import from_state_dict
from metanet import Axis, Group, TensorSpec, WeightSpace, to_graph, to_weights
from metanet.nn import (
    GMN,
    FlatMLP,
    StatNN,
    UNFLinear,
    UNFPointwise,
    UNFPool,
    basis_terms,
    pieces_of,
)
from metanet.testing import assert_equivariant
from tests.fixtures.architectures import ZOO
from tests.fixtures.zoo import MLP
from tests.helpers import attention_space, converted

# every zoo model but the 22M-parameter MiniLM (its graph alone has 22.7M edges)
MODELS = [e for e in ZOO if not e.name.startswith("hf_minilm")]
IDS = [e.name for e in MODELS]


def _weights64(model):
    return {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _gmn_fns(space, weights):
    g = to_graph(space, weights)
    torch.manual_seed(0)
    eq = GMN(g.x.shape[1], g.edge_attr.shape[1], hidden=16, layers=2, equivariant=True).double()
    inv = GMN(g.x.shape[1], g.edge_attr.shape[1], hidden=16, layers=2, out_features=3, summary=4)
    inv = inv.double()

    def equivariant(w):
        graph = to_graph(space, w)
        return to_weights(space, GMN.as_graph(graph, *eq(graph)))

    return equivariant, lambda w: inv(to_graph(space, w))


@pytest.mark.parametrize("entry", MODELS, ids=IDS)
def test_gmn_equivariant_and_invariant(entry):
    model, _, space = converted(entry)
    w = _weights64(model)
    equivariant, invariant = _gmn_fns(space, w)
    assert assert_equivariant(equivariant, space, w, n=5, atol=1e-8) < 1e-8
    assert assert_equivariant(invariant, space, w, n=5, atol=1e-8) < 1e-8


@pytest.mark.parametrize("entry", MODELS, ids=IDS)
def test_unf_equivariant_and_invariant(entry):
    model, _, space = converted(entry)
    torch.manual_seed(0)
    layer = UNFLinear(space, 1, 2).double()
    pool = UNFPool(space, 2)
    feats = {k: v[None, None] for k, v in _weights64(model).items()}
    assert assert_equivariant(layer, space, feats, n=5, atol=1e-8) < 1e-8
    assert assert_equivariant(lambda f: pool(layer(f)), space, feats, n=5, atol=1e-8) < 1e-8
    out = layer(feats)
    assert all(out[k].abs().sum() > 0 for k in out if space.tensors[k].groups)


def _first_weight(space):
    return next(t for t in space.tensors.values() if t.is_edge)


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vit_tiny"])
def test_not_invariant_to_a_fixed_axis(name):
    """Permuting input pixels/features (a fixed axis) must change invariant outputs."""
    entry = next(e for e in ZOO if e.name == name)
    model, _, space = converted(entry)
    w = _weights64(model)
    t = _first_weight(space)
    assert t.axes[t.in_axis].is_fixed
    perm = torch.randperm(t.shape[t.in_axis], generator=torch.Generator().manual_seed(0))
    assert perm.ne(torch.arange(perm.numel())).any()
    shuffled = dict(w)
    shuffled[t.name] = w[t.name].index_select(t.in_axis, perm)
    _, gmn = _gmn_fns(space, w)
    assert (gmn(w) - gmn(shuffled)).abs().max() > 1e-6
    torch.manual_seed(0)
    layer, pool = UNFLinear(space, 1, 2).double(), UNFPool(space, 2)
    head = nn.Linear(pool.out_features, 1).double()

    def unf(x):
        return head(pool(layer({k: v[None, None] for k, v in x.items()})))

    assert (unf(w) - unf(shuffled)).abs().max() > 1e-6


def _bell(n: int) -> int:
    row = [1]
    for _ in range(n):
        nxt = [row[-1]]
        for v in row:
            nxt.append(nxt[-1] + v)
        row = nxt
    return row[0]


def test_bell_number_term_counts():
    # a 2-layer MLP whose input and output neurons are permutable too: 32 terms
    mlp = WeightSpace.build(
        [Group("i", 3), Group("h", 4), Group("o", 2)],
        [
            TensorSpec("W1", (4, 3), (Axis.of("h", 4), Axis.of("i", 3))),
            TensorSpec("b1", (4,), (Axis.of("h", 4),)),
            TensorSpec("W2", (2, 4), (Axis.of("o", 2), Axis.of("h", 4))),
            TensorSpec("b2", (2,), (Axis.of("o", 2),)),
        ],
    )
    assert UNFLinear(mlp, 1, 1).num_terms == 32
    recurrent = WeightSpace.build(
        [Group("h", 5)], [TensorSpec("U", (5, 5), (Axis.of("h", 5),) * 2)]
    )
    assert UNFLinear(recurrent, 1, 1).num_terms == 15
    # every pair of a real space: product over groups of Bell(m_g + n_g)
    space = from_state_dict(MLP((5, 7, 6, 3)).state_dict(), "mlp")
    for po in pieces_of(space):
        for pi in pieces_of(space):
            counts: dict[str, int] = {}
            for g in po.index_groups + pi.index_groups:
                counts[g] = counts.get(g, 0) + 1
            assert len(basis_terms(po, pi)) == math.prod(_bell(n) for n in counts.values())


def test_wreath_constraint_is_needed():
    """Without the per-head constraint the basis would not be equivariant."""
    space = attention_space()
    feats = {k: torch.randn(2, 1, *t.shape, dtype=torch.float64) for k, t in space.tensors.items()}
    torch.manual_seed(0)
    layer = UNFLinear(space, 1, 1).double()
    assert_equivariant(layer, space, feats, n=3)
    flat = WeightSpace(
        {n: Group(n, g.size) for n, g in space.groups.items() if g.within is None}
        | {"qk": Group("qk", 4), "v": Group("v", 4)},
        space.tensors,
        space.neuron_sets,
        space.identities,
    )
    blind = UNFLinear(flat, 1, 1).double()  # the same layer built as if head_dim were shared
    assert blind.num_terms > layer.num_terms
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(blind, space, feats, n=3)


def _small_space(kind: str) -> WeightSpace:
    if kind == "mlp":
        return from_state_dict(MLP((2, 3, 3, 2)).state_dict(), "mlp")
    if kind == "recurrent":
        h = Axis.of("h", 3)
        return WeightSpace.build([Group("h", 3)], [TensorSpec("U", (3, 3), (h, h))])
    # both axes concatenations of segments: a 3x3 grid of pieces
    ax = Axis.concat(Axis.of("a", 2), Axis.of("b", 2), Axis.fixed(1))
    return WeightSpace.build(
        [Group("a", 2), Group("b", 2)],
        [TensorSpec("T", (5, 5), (ax, ax)), TensorSpec("v", (5,), (ax,))],
    )


@pytest.mark.parametrize("basis", ["full", "nfn"])
@pytest.mark.parametrize("kind", ["mlp", "recurrent", "grid"])
def test_unf_gradients(kind, basis):
    """UNFLinear's hand-written derivatives (an input piece's reads, their gradients summed
    broadcast) are right in reverse mode to second order and in forward mode. Covers the
    wide-weight path (an MLP's fixed inputs folded into channels), input diagonals (a
    recurrent matrix) and tensors cut into a grid of pieces."""
    space = _small_space(kind)
    torch.manual_seed(0)
    layer = UNFLinear(space, 1, 2, basis=basis).double()
    names = list(space.tensors)
    feats = [torch.randn(1, 1, *space.tensors[n].shape, dtype=torch.float64) for n in names]

    def fn(*xs):
        out = layer(dict(zip(names, xs)))
        return tuple(out[n] for n in names)

    inputs = [x.requires_grad_() for x in feats]
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gmn_batches_mixed_architectures():
    graphs = []
    for name in ("mlp", "cnn_bn", "vit_tiny", "lstm_lm"):
        model, _, space = converted(next(e for e in ZOO if e.name == name))
        graphs.append(to_graph(space, _weights64(model), node_dim=24, edge_dim=16))
    batch = Batch.from_data_list(graphs)
    gmn = GMN(24, 16, hidden=8, layers=1, out_features=2).double()
    out = gmn(batch)
    assert out.shape == (4, 2)
    single = torch.cat([gmn(Batch.from_data_list([g])) for g in graphs])
    assert torch.allclose(out, single, atol=1e-10)


def test_baselines_shapes_and_statnn_invariance():
    model, _, space = converted(next(e for e in ZOO if e.name == "mlp"))
    w = {k: v[None].double() for k, v in _weights64(model).items()}
    flat = FlatMLP(space, out_features=2).double()
    stat = StatNN(space, out_features=2).double()
    assert flat(w).shape == stat(w).shape == (1, 2)
    assert assert_equivariant(stat, space, w, n=3) < 1e-8
    with pytest.raises(AssertionError):
        assert_equivariant(flat, space, w, n=3)


def test_pointwise_is_equivariant():
    model, _, space = converted(next(e for e in ZOO if e.name == "mlp"))
    feats = {k: v[None, None] for k, v in _weights64(model).items()}
    assert assert_equivariant(UNFPointwise(nn.Tanh()), space, feats) < 1e-12
