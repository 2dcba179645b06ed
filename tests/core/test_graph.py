"""ParamGraph: exact round trip, node relabelling under the group, batching."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from converters import from_state_dict
from metanet import ParamGraph, WeightSpaceError, node_permutation, to_graph, to_weights
from tests.fixtures.zoo import family_models
from tests.helpers import attention_space


def cases():
    out = []
    for name, family, model, _ in family_models():
        for dtype in (torch.float32, torch.float64):
            sd = model.to(dtype).state_dict()
            out.append((f"{name}-{str(dtype)[6:]}", from_state_dict(sd, family), sd))
    torch.manual_seed(0)
    space = attention_space()
    out.append(("attention", space, {n: torch.randn(t.shape) for n, t in space.tensors.items()}))
    return out


CASES = cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,space,weights", CASES, ids=IDS)
def test_round_trip_is_exact(name, space, weights):
    graph = to_graph(space, weights)
    back = to_weights(space, graph)
    assert back.keys() == weights.keys()
    for k in weights:
        assert back[k].dtype == weights[k].dtype, k
        assert torch.equal(back[k], weights[k]), k


@pytest.mark.parametrize("name,space,weights", CASES, ids=IDS)
def test_permuted_graph_is_relabelled_graph(name, space, weights):
    """graph(g·w) is graph(w) with node i of the new graph = node perm[i] of the old."""
    base = to_graph(space, weights)
    n = base.num_nodes
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        g = space.random_element(gen)
        new = to_graph(space, space.apply(weights, g))
        perm = node_permutation(space, g)
        assert sorted(perm.tolist()) == list(range(n))
        moved = perm.ne(torch.arange(n)).sum().item()
        assert moved > 0 or not space.groups
        for key in ("x", "node_type", "node_layer", "node_pos"):
            assert torch.equal(new[key], base[key][perm]), key
        # every new edge (block, src, dst, attr) is an old edge between the mapped nodes
        key_old = (base.edge_block() * n + base.edge_index[0]) * n + base.edge_index[1]
        src, dst = perm[new.edge_index[0]], perm[new.edge_index[1]]
        key_new = (new.edge_block() * n + src) * n + dst
        order = key_old.argsort()
        pos = torch.searchsorted(key_old[order], key_new)
        assert torch.equal(key_old[order][pos], key_new)
        assert torch.equal(new.edge_attr, base.edge_attr[order][pos])
        assert new.edge_index.shape == base.edge_index.shape


def test_graph_layout_of_mlp():
    name, family, model, _ = family_models()[0]  # MLP 16-32-24-5
    space = from_state_dict(model.state_dict(), family)
    graph = to_graph(space, model.state_dict())
    assert graph.num_nodes == 16 + 32 + 24 + 5
    assert graph.edge_index.shape == (2, 16 * 32 + 32 * 24 + 24 * 5)
    assert graph.x.shape == (77, 5)
    # the first weight W[o, i] is the edge input i -> hidden o, in row-major order
    w = model.state_dict()["layers.0.weight"]
    assert graph.edge_index[:, 1].tolist() == [1, 16]
    assert graph.edge_attr[1, 0] == w[0, 1]
    # bias sits in column 0 of its neurons; inputs/outputs carry their positions
    assert torch.equal(graph.x[16:48, 0], model.state_dict()["layers.0.bias"])
    assert graph.node_pos[:16].tolist() == list(range(16))
    assert graph.node_pos[16:72].eq(-1).all()
    assert graph.node_pos[72:].tolist() == list(range(5))
    assert graph.node_type.tolist() == [0] * 16 + [1] * 56 + [2] * 5
    assert graph.node_layer.unique().tolist() == [0, 1, 2, 3]


def test_conv_edges_carry_taps_and_positions():
    name, family, model, _ = next(m for m in family_models() if m[0] == "cnn_bn")
    sd = model.state_dict()
    space = from_state_dict(sd, family)
    graph = to_graph(space, sd)
    w = sd["features.0.weight"]  # (8, 3, 3, 3)
    assert graph.edge_attr.shape[1] == 9
    assert torch.equal(graph.edge_attr[: 8 * 3].view(8, 3, 3, 3), w)
    assert graph.block_type.tolist()[:3] == [1, 1, 1]
    assert graph.tap_pos[0, :, :2].tolist()[0] == [-1.0, -1.0]
    assert graph.tap_pos[0, 4].tolist() == [0.0, 0.0, 0.0]
    # dense blocks are zero-padded beyond their single tap
    dense = graph.edge_type() == 0
    assert dense.any() and graph.edge_attr[dense, 1:].eq(0).all()
    # BatchNorm parameters in their role columns
    assert torch.equal(graph.x[3:11, 1], sd["features.1.weight"])
    assert torch.equal(graph.x[3:11, 4], sd["features.1.running_var"])
    # num_batches_tracked (int64) is bookkeeping, kept exactly and never a feature
    assert graph.rest.numel() == 0 and graph.rest_int.tolist() == [7, 7, 7]


def test_identity_edges_for_residuals():
    space = attention_space()
    w = {n: torch.randn(t.shape) for n, t in space.tensors.items()}
    graph = to_graph(space, w)
    ident = graph.edge_type() == 2
    assert ident.sum() == 12
    assert graph.edge_attr[ident, 0].eq(1).all()
    assert graph.node_type[graph.edge_index[0, ident]].eq(3).all()


def test_batches_of_different_architectures():
    graphs, spaces, weights = [], [], []
    for _name, family, model, _ in family_models():
        sd = model.state_dict()
        space = from_state_dict(sd, family)
        graphs.append(to_graph(space, sd, node_dim=6, edge_dim=9))
        spaces.append(space)
        weights.append(sd)
    batch = Batch.from_data_list(graphs)
    assert batch.num_graphs == len(graphs)
    assert batch.x.shape[1] == 6 and batch.edge_attr.shape[1] == 9
    # per-edge block ids index the batched block tables
    assert batch.edge_block().max() == batch.block_type.numel() - 1
    assert batch.edge_block().numel() == batch.edge_index.shape[1]
    assert torch.equal(batch.edge_type(), torch.cat([g.edge_type() for g in graphs]))
    for g, space, sd in zip(batch.to_data_list(), spaces, weights):
        back = to_weights(space, g)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    loader = DataLoader(graphs, batch_size=2, shuffle=False)
    sizes = [b.num_graphs for b in loader]
    assert sizes == [2, 2, 1]


def test_errors():
    name, family, model, _ = family_models()[0]
    sd = model.state_dict()
    space = from_state_dict(sd, family)
    with pytest.raises(WeightSpaceError, match="edge_dim=0 is too small"):
        to_graph(space, sd, edge_dim=0)
    graph = to_graph(space, sd)
    batch = Batch.from_data_list([graph, graph])
    with pytest.raises(WeightSpaceError, match="unbatch"):
        to_weights(space, batch)


def test_to_networkx():
    name, family, model, _ = family_models()[0]
    sd = model.state_dict()
    space = from_state_dict(sd, family)
    graph = to_graph(space, sd)
    assert isinstance(graph, ParamGraph)
    nxg = graph.to_networkx()
    assert nxg.number_of_nodes() == graph.num_nodes
    assert nxg.number_of_edges() == graph.edge_index.shape[1]
    w = sd["layers.2.weight"]
    assert nxg.edges[16 + 5, 16 + 32 + 3]["weight"] == pytest.approx(w[3, 5].item())
    assert nxg.nodes[0]["node_type"] == 0


@pytest.mark.parametrize("name,space,weights", CASES, ids=IDS)
def test_graph_gather_matches_to_graph(name, space, weights):
    """GraphGather's batched, multi-channel graphs equal to_graph channel by channel, and
    its read-back equals to_weights on graph-held tensors (zeros elsewhere)."""
    from metanet import GraphGather

    gather = GraphGather(space)
    feats = {
        n: torch.stack([w, 2 * w + 1])[None].repeat(3, 1, *[1] * w.dim())
        for n, w in weights.items()
    }
    feats = {n: f.to(torch.float64) for n, f in feats.items()}
    graph = gather.graph(feats)
    assert graph.num_graphs == 3
    for c in range(2):
        ref = to_graph(space, {n: f[0, c] for n, f in feats.items()})
        nd, ed = gather.node_dim, gather.edge_dim
        x = graph.x.view(3, gather.num_nodes, 2, nd)[1, :, c]
        e = graph.edge_attr.view(3, gather.num_edges, 2, ed)[1, :, c]
        assert torch.equal(x, ref.x.to(x.dtype)) and torch.equal(e, ref.edge_attr.to(e.dtype))
    ch0 = (
        graph.x.view(-1, 2, gather.node_dim)[:, 0],
        graph.edge_attr.view(-1, 2, gather.edge_dim)[:, 0],
    )
    back = gather.weights(*ch0)
    for n, t in space.tensors.items():
        expected = feats[n][:, 0] if (t.is_edge or t.is_node) else torch.zeros_like(feats[n][:, 0])
        assert torch.equal(back[n], expected), n


def _same_graph(g, h) -> bool:
    return g.keys() == h.keys() and all(
        torch.equal(g[k], h[k]) if torch.is_tensor(h[k]) else g[k] == h[k] for k in h.keys()
    )


@pytest.mark.parametrize("name,space,weights", CASES, ids=IDS)
def test_cached_structure_is_the_structure_and_not_shared(name, space, weights, monkeypatch):
    """A space's second graph reuses its structure: equal to one built from scratch, and
    each graph owns its tensors (changing one in place leaves the next one alone)."""
    import gc

    from metanet import graph as graph_module

    graph_module._SKELETONS.pop(id(space), None)
    to_graph(space, weights)  # builds and keeps the structure
    assert id(space) in graph_module._SKELETONS
    other = {k: (v * 2 if v.is_floating_point() else v) for k, v in weights.items()}
    again = to_graph(space, other)
    graph_module._SKELETONS.pop(id(space))
    fresh = to_graph(space, other)
    assert _same_graph(again, fresh)
    for key in ("edge_index", "node_type", "node_pos", "block_size", "tap_pos"):
        expected = fresh[key].clone()
        to_graph(space, other)[key].add_(1)  # the caller's to change, not the cache's
        assert torch.equal(to_graph(space, other)[key], expected), key
    assert torch.equal(to_weights(space, again)[next(iter(space.tensors))],
                       other[next(iter(space.tensors))])  # fmt: skip

    monkeypatch.setattr(graph_module, "_CACHED_EDGES", -1)  # a large graph: nothing kept
    graph_module._SKELETONS.pop(id(space))
    large = to_graph(space, other)
    assert id(space) not in graph_module._SKELETONS
    assert _same_graph(large, fresh)
    monkeypatch.undo()

    copy = space.replace()  # another live space: its own entry, gone with it
    to_graph(copy, weights)
    key = id(copy)
    assert key in graph_module._SKELETONS
    del copy
    gc.collect()
    assert key not in graph_module._SKELETONS
