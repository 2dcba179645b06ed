"""The parameter-graph transformer: invariant on the zoo (float64), mixed batches equal
single graphs, and sensitive to what the symmetry does not allow."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch_geometric.data import Batch

from metanet import to_graph
from metanet.nn import GraphTransformer
from metanet.testing import assert_equivariant
from tests.fixtures.architectures import ZOO
from tests.helpers import converted

# graphs of up to a few thousand neurons (attention is dense within a graph)
NAMES = ["mlp", "siren", "cnn_bn", "resnet20", "vit_tiny", "lstm_lm"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("unet", "transformer_lm")
]


def _entry(name):
    return next(e for e in ZOO if e.name == name)


def _weights64(model):
    return {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _model(graph, out=3):
    torch.manual_seed(0)
    return GraphTransformer(
        graph.x.shape[1], graph.edge_attr.shape[1], hidden=16, layers=2, out_features=out, heads=4
    ).double()


@pytest.mark.parametrize("name", NAMES)
def test_invariant_on_the_zoo(name):
    model, _, space = converted(_entry(name))
    w = _weights64(model)
    net = _model(to_graph(space, w))
    assert assert_equivariant(lambda v: net(to_graph(space, v)), space, w, n=3, atol=1e-8) < 1e-8


def test_not_invariant_to_a_fixed_axis():
    model, _, space = converted(_entry("mlp"))
    w = _weights64(model)
    t = next(t for t in space.tensors.values() if t.is_edge)
    perm = torch.randperm(t.shape[t.in_axis], generator=torch.Generator().manual_seed(0))
    shuffled = dict(w)
    shuffled[t.name] = w[t.name].index_select(t.in_axis, perm)
    net = _model(to_graph(space, w))
    assert (net(to_graph(space, w)) - net(to_graph(space, shuffled))).abs().max() > 1e-6


def test_mixed_batch_equals_single_graphs():
    graphs = []
    for name in ("mlp", "cnn_bn", "vit_tiny", "lstm_lm"):
        model, _, space = converted(_entry(name))
        graphs.append(to_graph(space, _weights64(model), node_dim=24, edge_dim=16))
    net = GraphTransformer(24, 16, hidden=8, layers=2, out_features=2, heads=2).double()
    out = net(Batch.from_data_list(graphs))
    single = torch.cat([net(Batch.from_data_list([g])) for g in graphs])
    assert out.shape == (4, 2)
    torch.testing.assert_close(out, single, atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter():
    model, _, space = converted(_entry("siren"))
    g = to_graph(space, _weights64(model))
    net = _model(g)
    net(Batch.from_data_list([g, g])).sum().backward()
    for name, p in net.named_parameters():
        if name != "tap_code.weight":  # a SIREN has no kernels: every tap position is 0
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_kernel_chunks_are_told_apart():
    """A 3x3 kernel cut into chunks of 4 taps gives parallel edges per channel pair; the
    transformer shares GMN's input embedding (``GraphInputs``), whose tap-position code
    tells those chunks apart (it had none: swapping which chunk holds which taps did not
    change its output)."""
    model, _, space = converted(_entry("cnn_bn"))
    w = _weights64(model)
    graph = to_graph(space, w, edge_dim=4)
    assert (graph.block_taps < 4).any()  # kernels were cut into chunks
    net = _model(graph)
    with torch.no_grad():
        net.tap_code.weight.normal_()
        swapped = graph.clone()
        swapped.tap_pos = graph.tap_pos.flip(0)  # each chunk labelled with another's taps
        swapped.block_taps = graph.block_taps.flip(0)
        assert (net(graph) - net(swapped)).abs().max() > 1e-6


def test_weights_saved_without_the_tap_code_still_load():
    """A transformer state dict from before the shared input embedding (no
    ``tap_code.weight``) loads with a warning, as zeros: the function it was saved as."""
    model, _, space = converted(_entry("cnn_bn"))
    graph = to_graph(space, _weights64(model), edge_dim=4)
    net = _model(graph)
    with torch.no_grad():
        net.tap_code.weight.zero_()
    old = {k: v for k, v in net.state_dict().items() if k != "tap_code.weight"}
    fresh = _model(graph)
    with torch.no_grad():
        fresh.tap_code.weight.normal_()
    with pytest.warns(UserWarning, match="tap_code"):
        fresh.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(fresh(graph), net(graph))


def test_a_state_dict_of_another_model_fails_without_the_tap_code_warning():
    """Only a dict in the old layout is filled in: one missing the embeddings altogether
    fails on its missing keys, with no word about the tap code."""
    model, _, space = converted(_entry("cnn_bn"))
    graph = to_graph(space, _weights64(model), edge_dim=4)
    net = _model(graph)
    other = {
        k: v for k, v in net.state_dict().items() if not k.startswith(("tap_code", "edge_type"))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="edge_type.weight") as err:
            net.load_state_dict(other)
    assert "tap_code.weight" in str(err.value)
