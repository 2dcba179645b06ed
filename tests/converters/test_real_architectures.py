"""Real architectures: graphs in memory proportional to the weights (kernels in chunks),
UNF layers sized by the symmetric structure (bounded folds, pairs by signature, a
factored invariant pathway), integer buffers never features. Fast tests on small
spaces for every code path; slow ones on the ImageNet-size fixtures."""

from __future__ import annotations

import math
import time

import pytest
import torch

from converters import from_module, from_state_dict
from metanet import GraphGather, WeightSpace, node_permutation, to_graph, to_weights
from metanet.graph import GraphLayout, feature_tensors
from metanet.nn import GMN, FlatMLP, StatNN, UNFLinear, UNFPool, basis_terms
from metanet.nn.unf import _cosine_basis, _decode, _encode, cosine_ranks
from metanet.testing import assert_equivariant, assert_function_preserved
from tests.fixtures.architectures import vit_tiny
from tests.fixtures.large import LARGE, SwinTransformer, _randomize
from tests.fixtures.zoo import family_models
from tests.helpers import attention_space


def _float64(sd):
    return {k: v.double() if v.is_floating_point() else v.clone() for k, v in sd.items()}


def _cnn_bn():
    _, family, model, _ = next(m for m in family_models() if m[0] == "cnn_bn")
    sd = _float64(model.state_dict())
    return from_state_dict(sd, family), sd


def _mlp():
    _, family, model, _ = family_models()[0]
    sd = _float64(model.state_dict())
    return from_state_dict(sd, family), sd


def _vit_tiny():
    model = vit_tiny().double()
    return from_module(model, (torch.randn(2, 3, 16, 16, dtype=torch.float64),)), _float64(
        model.state_dict()
    )


def _tiny_swin():
    """Two shifted-window blocks (4 windows of 2x2 patches): int relative_position_index."""
    torch.manual_seed(0)
    model = _randomize(SwinTransformer(8, (2,), (2,), window=2, num_classes=3), 0).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    return model, x, from_module(model, (x,))


_CACHE: dict[str, tuple] = {}


def small(name: str):
    if name not in _CACHE:
        if name == "swin":
            model, _, space = _tiny_swin()
            _CACHE[name] = (space, _float64(model.state_dict()))
        else:
            _CACHE[name] = {"cnn_bn": _cnn_bn, "mlp": _mlp, "vit_tiny": _vit_tiny}[name]()
    return _CACHE[name]


def _edge_weights(space: WeightSpace) -> int:
    return sum(math.prod(t.shape) for t in space.tensors.values() if t.is_edge)


# ----------------------------------------------------------------------------- graphs


@pytest.mark.parametrize("edge_dim", [1, 2, 4, 9, 16])
@pytest.mark.parametrize("name", ["cnn_bn", "vit_tiny"])
def test_chunked_kernels_round_trip_and_relabel(name, edge_dim):
    """Kernels cut into chunks of ``edge_dim`` taps: the round trip is exact, each chunk is
    a block whose tap_pos lists its taps, and graph(g·w) is graph(w) relabelled."""
    space, w = small(name)
    graph = to_graph(space, w, edge_dim=edge_dim)
    back = to_weights(space, graph)
    assert all(torch.equal(back[k], w[k]) and back[k].dtype == w[k].dtype for k in w)
    layout = GraphLayout.of(space, edge_dim=edge_dim)
    sizes = {s.name: s.axis.size for s in space.neuron_sets.values()}
    pairs = {n: sizes[t.out_set] * sizes[t.in_set] for n, t in space.tensors.items() if t.is_edge}
    chunks = {n: -(-math.prod(space.tensors[n].tap_shape) // edge_dim) for n in pairs}
    assert layout.edge_chunks == chunks
    assert graph.edge_index.shape[1] == sum(pairs[n] * chunks[n] for n in pairs) + sum(
        sizes[a] for a, _ in space.identities
    )
    # the chunks of the widest kernel list its taps in row-major order, chunk by chunk
    widest = max(pairs, key=lambda n: math.prod(space.tensors[n].tap_shape))
    first = list(pairs).index(widest)
    block = sum(chunks[n] for n in list(pairs)[:first])
    taps = graph.block_taps[block : block + chunks[widest]]
    assert taps.sum() == math.prod(space.tensors[widest].tap_shape)
    pos = torch.cat([graph.tap_pos[block + j, : taps[j]] for j in range(chunks[widest])])
    assert pos.unique(dim=0).shape[0] == pos.shape[0]  # every tap once
    n = graph.num_nodes
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        g = space.random_element(gen)
        new = to_graph(space, space.apply(w, g), edge_dim=edge_dim)
        perm = node_permutation(space, g)
        assert torch.equal(new.x, graph.x[perm])
        key_old = (graph.edge_block() * n + graph.edge_index[0]) * n + graph.edge_index[1]
        src, dst = perm[new.edge_index[0]], perm[new.edge_index[1]]
        key_new = (new.edge_block() * n + src) * n + dst
        order = key_old.argsort()
        at = torch.searchsorted(key_old[order], key_new)
        assert torch.equal(key_old[order][at], key_new)
        assert torch.equal(new.edge_attr, graph.edge_attr[order][at])


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "vit_tiny", "swin"])
def test_default_edge_dim_keeps_graphs_proportional_to_weights(name):
    """The default edge_dim costs at most what one edge per weight does (20 bytes per
    weight for edge_index + float32 edge_attr); kernel-free graphs have one edge per weight
    (T = 1), a CNN of 3x3 kernels one edge per kernel (T = 9)."""
    space, w = small(name)
    graph = to_graph(space, {k: v.float() if v.is_floating_point() else v for k, v in w.items()})
    ident = sum(space.neuron_sets[a].axis.size for a, _ in space.identities)
    edges = graph.edge_index.shape[1] - ident
    nbytes = edges * 16 + edges * graph.edge_attr.shape[1] * 4
    assert nbytes <= 20 * _edge_weights(space)
    expected_t = {"mlp": 1, "cnn_bn": 9}
    if name in expected_t:
        assert graph.edge_attr.shape[1] == expected_t[name]
    if name == "mlp":
        assert edges == _edge_weights(space)


def test_graph_gather_with_chunked_kernels():
    """GraphGather equals to_graph channel by channel with kernels in chunks."""
    space, w = small("vit_tiny")
    gather = GraphGather(space, edge_dim=3)
    feats = {n: torch.stack([w[n], 2 * w[n] + 1])[None] for n in feature_tensors(space)}
    graph = gather.graph(feats)
    for c in range(2):
        ref = to_graph(space, {n: f[0, c] for n, f in feats.items()}, edge_dim=3)
        e = graph.edge_attr.view(gather.num_edges, 2, 3)[:, c]
        assert torch.equal(e, ref.edge_attr)
    back = gather.weights(graph.x.view(-1, 2, gather.node_dim)[:, 0], graph.edge_attr[:, :3])
    for n, t in space.tensors.items():
        if t.is_edge:
            assert torch.equal(back[n][0], w[n]), n


def test_integer_buffers_are_not_features():
    """num_batches_tracked / relative_position_index: kept exactly in rest_int (even past
    float precision), absent from x and edge_attr, from UNF's pieces and outputs, and from
    the baselines' inputs; a space without them gives the same graphs and layer sizes."""
    space, w = small("swin")
    ints = [n for n, t in space.tensors.items() if not t.dtype.startswith("float")]
    assert any("relative_position_index" in n for n in ints)
    w = dict(w)
    w[ints[0]] = w[ints[0]] + 2**40  # not representable in float32, nor shifted in float64
    graph = to_graph(space, w)
    back = to_weights(space, graph)
    assert all(torch.equal(back[n], w[n]) and back[n].dtype == w[n].dtype for n in ints)
    d = space.to_dict()
    for n in ints:
        del d["tensors"][n]
    floats = WeightSpace.from_dict(d)
    plain = to_graph(floats, w)
    assert torch.equal(plain.x, graph.x) and torch.equal(plain.edge_attr, graph.edge_attr)
    assert plain.rest_int.numel() == 0 and graph.rest_int.numel() == sum(w[n].numel() for n in ints)
    for cls in (UNFLinear, FlatMLP, StatNN):
        lead = (None, None) if cls is UNFLinear else (None,)
        every = {n: v[lead] for n, v in w.items()}  # the int buffers too: ignored
        feats = {n: v for n, v in every.items() if v.is_floating_point()}
        torch.manual_seed(0)
        a = cls(space, 1, 2) if cls is UNFLinear else cls(space)
        torch.manual_seed(0)
        b = cls(floats, 1, 2) if cls is UNFLinear else cls(floats)
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()], cls
        ya, yb = a.double()(every), b.double()(feats)
        if cls is UNFLinear:
            assert all(torch.equal(ya[k], yb[k]) for k in feature_tensors(space))
            assert all(ya[n] is every[n] for n in ints)  # passed through, not features
        else:
            assert torch.equal(ya, yb)


def test_tiny_swin_function_preserved():
    model, x, space = _tiny_swin()
    assert assert_function_preserved(model, space, (x,), n=3) < 1e-10


# -------------------------------------------------------------------------------- GMN


@pytest.mark.parametrize("name", ["cnn_bn", "vit_tiny"])
def test_gmn_equivariant_on_chunked_kernels(name):
    space, w = small(name)
    g = to_graph(space, w, edge_dim=4)
    torch.manual_seed(0)
    eq = GMN(g.x.shape[1], 4, hidden=8, layers=2, equivariant=True).double()
    inv = GMN(g.x.shape[1], 4, hidden=8, layers=2, out_features=2).double()

    def equivariant(v):
        graph = to_graph(space, v, edge_dim=4)
        return to_weights(space, GMN.as_graph(graph, *eq(graph)))

    assert assert_equivariant(equivariant, space, w, n=3, atol=1e-8) < 1e-8
    assert assert_equivariant(lambda v: inv(to_graph(space, v, edge_dim=4)), space, w, n=3) < 1e-8
    # the chunks of one kernel are told apart: their tap codes differ
    code = inv.block_codes(g).repeat_interleave(g.block_size, dim=0)  # per edge
    kernel = g.block_size.cumsum(0)[(g.block_type == 1).nonzero()[:2, 0]] - 1
    assert not torch.allclose(code[kernel[0]], code[kernel[1]])


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "vit_tiny"])
@pytest.mark.parametrize("equivariant", [False, True])
def test_gmn_edge_chunked_is_the_same_function(name, equivariant):
    """Edge-chunked message passing (recomputed edge states under checkpointing) gives the
    one-pass forward and its gradients, in float64, on a batch of two networks whose
    chunks cross graph boundaries; and it stays equivariant."""
    from torch_geometric.data import Batch

    space, w = small(name)
    gen = torch.Generator().manual_seed(3)
    other = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        if v.is_floating_point()
        else v
        for k, v in w.items()
    }
    batch = Batch.from_data_list(
        [to_graph(space, w, edge_dim=4), to_graph(space, other, edge_dim=4)]
    )
    n_edges = batch.edge_index.shape[1]
    kw = dict(hidden=8, layers=3, equivariant=equivariant, out_features=2)
    kw["summary"] = 0 if equivariant else 5  # the DeepSets summary of node inputs too
    torch.manual_seed(0)
    whole = GMN(batch.x.shape[1], 4, edge_chunk=n_edges, **kw).double()
    chunked = GMN(batch.x.shape[1], 4, edge_chunk=max(1, n_edges // 7 + 3), **kw).double()
    chunked.load_state_dict(whole.state_dict())

    def run(model):
        model.zero_grad()
        out = model(batch)
        outs = out if equivariant else (out,)
        sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs
        ).backward()
        return [o.detach() for o in outs], {k: p.grad.clone() for k, p in model.named_parameters()}

    (out_w, grad_w), (out_c, grad_c) = run(whole), run(chunked)
    for a, b in zip(out_w, out_c, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert grad_w.keys() == grad_c.keys()
    for k in grad_w:
        torch.testing.assert_close(grad_c[k], grad_w[k], rtol=1e-9, atol=1e-11, msg=k)
    if not equivariant:
        graph = to_graph(space, w, edge_dim=4)
        small_chunks = GMN(graph.x.shape[1], 4, edge_chunk=50, **kw).double()
        assert graph.edge_index.shape[1] > 50
        check = lambda v: small_chunks(to_graph(space, v, edge_dim=4))  # noqa: E731
        assert assert_equivariant(check, space, w, n=2) < 1e-8


def test_gmn_edge_chunk_must_be_positive():
    with pytest.raises(ValueError, match="edge_chunk"):
        GMN(4, 1, edge_chunk=0)


def test_gmn_tap_code_vanishes_on_dense_graphs():
    """MLP graphs (no kernels) get the edge-type embedding alone, as before."""
    space, w = small("mlp")
    graph = to_graph(space, w)
    gmn = GMN(graph.x.shape[1], graph.edge_attr.shape[1], hidden=8).double()
    per_edge = gmn.block_codes(graph).repeat_interleave(graph.block_size, dim=0)
    assert torch.equal(per_edge, gmn.edge_type(graph.edge_type()))


# -------------------------------------------------------------------------------- UNF


def test_cosine_encoding_is_a_projection():
    basis = _cosine_basis(5, 12).double()  # stored in float32
    assert torch.allclose(basis @ basis.T / 12, torch.eye(5, dtype=torch.float64), atol=1e-6)
    c = torch.randn(2, 3 * 5, 4, dtype=torch.float64)
    assert torch.allclose(_encode(_decode(c, [basis], [12]), [basis], [12]), c, atol=1e-6)
    x = torch.randn(2, 3 * 12, 4, dtype=torch.float64)
    assert torch.allclose(_encode(x, [basis], [12])[:, ::5], x.view(2, 3, 12, 4).mean(2))


def test_tensor_product_cosines_over_several_fixed_axes():
    """A piece with several fixed axes (a vocabulary × width embedding) is encoded axis by
    axis: the same as the dense tensor-product basis, a projection, its first row the
    mean, and never a (K × fold) matrix. The ranks go to the coarsest axis first."""
    assert cosine_ranks((30522, 384), 64) == (64, 1)
    assert cosine_ranks((100, 90), 64) == (8, 8)
    assert cosine_ranks((3, 4), 64) == (3, 4)  # small enough: every value kept
    sizes, ranks = (10, 6), cosine_ranks((10, 6), 12)
    assert ranks == (4, 3)
    bases = [_cosine_basis(k, n).double() for k, n in zip(ranks, sizes)]
    dense = torch.einsum("ai,bj->abij", *bases).reshape(12, 60)
    x = torch.randn(2, 3 * 60, 5, dtype=torch.float64)
    want = torch.einsum("bcfn,kf->bckn", x.reshape(2, 3, 60, 5), dense / 60).reshape(2, 36, 5)
    got = _encode(x, bases, sizes)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got[:, ::12], x.view(2, 3, 60, 5).mean(2), atol=1e-12)
    c = torch.randn(2, 3 * 12, 5, dtype=torch.float64)
    assert torch.allclose(
        _encode(_decode(c, bases, sizes), bases, sizes), c, atol=1e-6
    )  # float32 basis


@pytest.mark.parametrize("basis", ["full", "nfn"])
@pytest.mark.parametrize("name", ["cnn_bn", "vit_tiny", "swin"])
def test_unf_equivariant_with_encoded_folds_and_factored_invariants(name, basis):
    """max_fold=4 encodes the first conv (27 fixed values per output channel), the head
    and every fully fixed tensor; invariant_rank=1 factors the invariant pathway: the
    layer and its pooling stay exactly equivariant / invariant in float64."""
    space, w = small(name)
    torch.manual_seed(0)
    layer = UNFLinear(space, 2, 3, basis=basis, max_fold=4, invariant_rank=1).double()
    pool = UNFPool(space, 3, max_fold=4).double()
    assert layer._projected and layer.invariant_in is not None
    assert pool.out_features == 3 * sum(layer.widths)
    feats = {
        n: torch.stack([v, v.sin()])[None] if v.is_floating_point() else v[None, None]
        for n, v in w.items()
    }
    assert assert_equivariant(layer, space, feats, n=3, atol=1e-9) < 1e-9
    assert assert_equivariant(lambda f: pool(layer(f)), space, feats, n=3, atol=1e-9) < 1e-9
    out = layer(feats)
    assert all(out[n].abs().sum() > 0 for n in feature_tensors(space))
    # an encoded tensor still sees its own values at full resolution
    tensors = [p.tensor for p in layer.pieces]
    name_i = next(tensors[i] for i in layer._projected if tensors.count(tensors[i]) == 1)
    bumped = dict(feats)
    bumped[name_i] = feats[name_i].clone()
    bumped[name_i].view(-1)[-1] += 1.0
    delta = layer(bumped)[name_i] - out[name_i]
    assert delta.reshape(1, 3, -1)[..., -1].abs().min() > 0


@pytest.mark.parametrize("basis", ["full", "nfn"])
@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "vit_tiny", "attention"])
def test_pairs_by_signature_span_the_whole_basis(name, basis):
    """Enumerating only pairs that share a group, plus the invariant pathway, yields every
    term of every pair: the term count and (unfactored, unencoded) parameter count equal
    the brute-force sums over all piece pairs."""
    if name == "attention":
        space = attention_space()
    else:
        space, _ = small(name)
    layer = UNFLinear(space, 2, 3, basis=basis, max_fold=10**6, invariant_rank=None, bias=False)
    terms = params = 0
    for po in layer.pieces:
        for pi in layer.pieces:
            n = len(basis_terms(po, pi, basis))
            terms += n
            params += n * 3 * po.fold * 2 * pi.fold
    assert layer.num_terms == terms
    assert sum(p.numel() for p in layer.parameters()) == params


# --------------------------------------------------------------- ImageNet-size fixtures

_LARGE_SPACES: dict[str, tuple] = {}


def _large(name: str):
    if name not in _LARGE_SPACES:
        factory, inputs = LARGE[name]
        model = factory()
        _LARGE_SPACES.clear()  # one large model in memory at a time
        _LARGE_SPACES[name] = (model, inputs(), from_module(model, inputs()))
    return _LARGE_SPACES[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LARGE))
def test_large_models_graphs_and_unf(name):
    """Each ImageNet-size fixture: its symmetry preserves the function (float64), its
    graph round-trips exactly in at most 20 bytes per weight, and the nfn UNF layer builds
    in under 30 s with fewer parameters than the model."""
    model, x, space = _large(name)
    assert assert_function_preserved(model, space, x, n=1, rtol=1e-9) < 1e-9
    sd = model.state_dict()
    graph = to_graph(space, sd)
    back = to_weights(space, graph)
    assert all(torch.equal(back[k], sd[k]) for k in space.tensors)
    ident = sum(space.neuron_sets[a].axis.size for a, _ in space.identities)
    edges = graph.edge_index.shape[1] - ident
    assert edges * (16 + 4 * graph.edge_attr.shape[1]) <= 20 * _edge_weights(space)
    del graph, back
    start = time.perf_counter()
    layer = UNFLinear(space, 1, 1, basis="nfn")
    assert time.perf_counter() - start < 30
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in layer.parameters()) < n_model
