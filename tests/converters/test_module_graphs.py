"""Parameter graphs of from_module spaces: every zoo model, exact round trip, relabelling."""

from __future__ import annotations

import pytest
import torch

from metanet import node_permutation, to_graph, to_weights
from tests.fixtures.architectures import ZOO
from tests.helpers import converted

SMALL = [e for e in ZOO if not e.name.startswith("hf_minilm")]


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_graph_round_trip(entry):
    model, _, space = converted(entry)
    sd = model.state_dict()
    graph = to_graph(space, sd)
    back = to_weights(space, graph)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # linear maps are edges (grouped/depthwise kernels: features of their output neurons);
    # only a tied alias (GPT-2's wte, read through lm_head) may be left loose
    weights = [t for t in space.tensors.values() if t.role == "weight" and len(t.shape) >= 2]
    loose = [t.name for t in weights if t.out_set is None]
    assert len(loose) <= 1, loose
    assert space.neuron_sets and graph.num_nodes == sum(
        s.axis.size for s in space.neuron_sets.values()
    )


@pytest.mark.parametrize("entry", SMALL, ids=[e.name for e in SMALL])
def test_graph_of_permuted_weights_is_relabelled_graph(entry):
    model, _, space = converted(entry)
    sd = model.state_dict()
    base = to_graph(space, sd)
    n = base.num_nodes
    g = space.random_element(torch.Generator().manual_seed(0))
    new = to_graph(space, space.apply(sd, g))
    perm = node_permutation(space, g)
    assert perm.ne(torch.arange(n)).any()
    assert torch.equal(new.x, base.x[perm])
    key_old = (base.edge_block() * n + base.edge_index[0]) * n + base.edge_index[1]
    key_new = (new.edge_block() * n + perm[new.edge_index[0]]) * n + perm[new.edge_index[1]]
    order = key_old.argsort()
    pos = torch.searchsorted(key_old[order], key_new)
    assert torch.equal(key_old[order][pos], key_new)
    assert torch.equal(new.edge_attr, base.edge_attr[order][pos])


def test_residual_streams_are_identity_edges():
    entry = next(e for e in ZOO if e.name == "resnet20")
    _, _, space = converted(entry)
    assert len(space.identities) >= 9  # one per residual block at least
    kinds = {s.kind for s in space.neuron_sets.values()}
    assert {"input", "hidden", "output", "residual"} <= kinds
