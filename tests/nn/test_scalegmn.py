"""ScaleGMN-style layers: the graph's sign/scale action keeps the network's function, and
the layers are equivariant (the model invariant) to it and to permutations, in float64,
on every zoo architecture."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from converters import from_module
from metanet import to_graph, to_weights
from metanet.graph import (
    ACTION_SCALE,
    ACTION_SIGN,
    node_actions,
    random_node_scales,
    scale_nodes,
)
from metanet.nn import ScaleGMN
from metanet.nn.gmn import tap_ends
from metanet.testing import assert_equivariant, max_error
from tasks.datasets.zoo import VARIED, zoo_cnn, zoo_space
from tests.fixtures.architectures import ZOO
from tests.helpers import converted

MODELS = [e for e in ZOO if not e.name.startswith("hf_minilm")]
IDS = [e.name for e in MODELS]


def _weights64(model):
    return {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _model(graph, seed: int = 0) -> ScaleGMN:
    torch.manual_seed(seed)
    net = ScaleGMN(graph.x.shape[1], graph.edge_attr.shape[1], hidden=8, layers=3, out_features=3)
    net = net.double().eval()
    # the layer-depth gains start at 1: draw them so the test sees a general model
    with torch.no_grad():
        net.gate.weight.normal_()
        net.edge_type.weight.normal_()
    return net


def _scaled_copies(graph, n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [scale_nodes(graph, random_node_scales(graph, gen)) for _ in range(n)]


@pytest.mark.parametrize("entry", MODELS, ids=IDS)
def test_graph_action_keeps_the_function(entry):
    """The per-node factors ``node_action`` allows (every node feature of ``i`` times
    ``q_i``, every edge ``j -> i`` times ``q_i / q_j``) leave the network's outputs
    unchanged: the annotation the layers trust is verified on the network itself."""
    model, inputs, space = converted(entry)
    w = _weights64(model)
    graph = to_graph(space, w)
    ref = functional_call(model, w, inputs, tie_weights=False)
    for scaled in _scaled_copies(graph):
        out = functional_call(model, {**w, **to_weights(space, scaled)}, inputs, tie_weights=False)
        assert max_error(ref, out, relative=True) < 1e-9


def test_actions_found_where_the_symmetry_is_plain():
    """Not vacuous: sign on the SIREN's and scale on the ReLU MLP's and the zoo CNN's hidden
    neurons; none where a norm or a residual add takes the action away."""
    by_name = {e.name: e for e in ZOO}
    _, _, siren = converted(by_name["siren"])
    assert set(node_actions(siren).values()) == {ACTION_SIGN}
    _, _, mlp = converted(by_name["mlp"])
    assert set(node_actions(mlp).values()) == {ACTION_SCALE}
    assert set(node_actions(zoo_space()).values()) == {ACTION_SCALE}
    assert node_actions(zoo_space(VARIED[0])) == {}  # activation varies: no action
    _, _, resnet = converted(by_name["resnet20"])
    assert node_actions(resnet) == {}  # BN'd convs and the residual stream


def test_zoo_cnn_action_keeps_the_function():
    model = zoo_cnn().double().eval()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    space = from_module(model, x)  # zoo_space(), recorded in float64
    assert node_actions(space) == node_actions(zoo_space())
    w = _weights64(model)
    graph = to_graph(space, w)
    assert (graph.node_action == ACTION_SCALE).sum() == 16
    ref = model(x)
    for scaled in _scaled_copies(graph):
        out = functional_call(model, {**w, **to_weights(space, scaled)}, (x,))
        assert max_error(ref, out, relative=True) < 1e-9


@pytest.mark.parametrize("entry", MODELS, ids=IDS)
def test_scalegmn_invariant(entry):
    model, _, space = converted(entry)
    w = _weights64(model)
    graph = to_graph(space, w)
    net = _model(graph)
    with torch.no_grad():
        ref = net(graph)
        assert torch.isfinite(ref).all()
        assert assert_equivariant(lambda v: net(to_graph(space, v)), space, w, n=3) < 1e-8
        for scaled in _scaled_copies(graph):
            assert max_error(ref, net(scaled)) < 1e-8


@pytest.mark.parametrize("name", ["siren", "mlp"])
def test_scalegmn_layers_equivariant(name):
    """Each block maps ``q``-scaled and permuted inputs to ``q``-scaled, permuted states."""
    from metanet.graph import node_permutation

    model, _, space = converted(next(e for e in ZOO if e.name == name))
    w = _weights64(model)
    graph = to_graph(space, w)
    net = _model(graph, seed=1)

    def states(g):
        h = net.node_lin(g.x) * net.gate(g.node_layer)  # every node has an action here or
        plain = net.node_plain(net.encode(g.x)) + net.node_type(g.node_type)  # none (q=1)
        plain = plain + net.layer_emb(g.node_layer) + net.pos_emb(g.node_pos + 1)
        h = torch.where((g.node_action == 0).unsqueeze(-1), plain, h)
        code = net.edge_type(g.block_type) + net.tap_code(tap_ends(g).double())
        e = net.edge_lin(g.edge_attr) * code.repeat_interleave(g.block_size, dim=0)
        for block in net.blocks:
            h = block(h, g.edge_index, e, g.node_action)
        return h

    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h = states(graph)
        q = random_node_scales(graph, gen)
        assert torch.allclose(states(scale_nodes(graph, q)), q.unsqueeze(-1) * h, atol=1e-9)
        element = space.random_element(gen)
        perm = node_permutation(space, element)
        h_perm = states(to_graph(space, space.apply(w, element)))
        assert torch.allclose(h_perm, h[perm], atol=1e-9)  # node i of the permuted: perm[i]


def test_scale_changes_plain_gmn_but_not_scalegmn():
    """The symmetry is real for the graph: GMN (permutations only) reads a rescaled ReLU
    network as a different input; ScaleGMN does not."""
    from metanet.nn import GMN

    model, _, space = converted(next(e for e in ZOO if e.name == "mlp"))
    graph = to_graph(space, _weights64(model))
    scaled = _scaled_copies(graph, n=1)[0]
    torch.manual_seed(0)
    gmn = GMN(graph.x.shape[1], graph.edge_attr.shape[1], hidden=8, layers=2, out_features=3)
    gmn = gmn.double().eval()
    with torch.no_grad():
        assert max_error(gmn(graph), gmn(scaled)) > 1e-4
        net = _model(graph)
        assert max_error(net(graph), net(scaled)) < 1e-8


def test_scalegmn_trains_a_batch():
    from torch_geometric.data import Batch

    model, _, space = converted(next(e for e in ZOO if e.name == "siren"))
    w = {k: v.float() for k, v in model.state_dict().items()}
    graphs = [to_graph(space, {k: v + 0.01 * i for k, v in w.items()}) for i in range(4)]
    batch = Batch.from_data_list(graphs)
    assert batch.node_action.shape[0] == batch.x.shape[0]
    torch.manual_seed(0)
    net = ScaleGMN(batch.x.shape[1], batch.edge_attr.shape[1], hidden=8, out_features=2)
    out = net(batch)
    assert out.shape == (4, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in net.blocks.parameters() if p.requires_grad)
