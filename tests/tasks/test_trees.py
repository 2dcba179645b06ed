"""Soft tree ensembles (tasks.align.trees): the three symmetries, their group laws, matching, and
the barrier ordering of Kanoh & Sugiyama (ICLR 2025) on one real dataset."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch.func import functional_call

from converters import from_module
from metanet import WeightSpace, WeightSpaceError
from tasks.align import weight_matching
from tasks.align.trees import (
    SoftTreeEnsemble,
    TreeSpace,
    interpolation,
    load_tabular,
    match_trees,
    train,
    tree_similarity,
)

F64 = torch.float64
KINDS = [pytest.param(False, id="non-oblivious"), pytest.param(True, id="oblivious")]


def _ensemble(oblivious, depth, trees=5, f=4, c=3, seed=0, **kw):
    torch.manual_seed(seed)
    model = SoftTreeEnsemble(f, c, trees, depth, oblivious=oblivious, dtype=F64, **kw)
    with torch.no_grad():  # sharp, varied splits: every routing probability matters
        model.split_weight.normal_(0, 2.0)
        model.split_bias.normal_(0, 1.0)
    x = torch.randn(64, f, dtype=F64)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, x, weights, TreeSpace.from_module(model, x[:2])


def _out(model, weights, x):
    return functional_call(model, weights, (x,))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- function
@pytest.mark.parametrize("oblivious", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_function_preserved_under_random_elements(oblivious, depth):
    model, x, w, ts = _ensemble(oblivious, depth)
    ref = _out(model, w, x)
    gen = torch.Generator().manual_seed(depth)
    for sym in [("flip", "order"), ("flip",), ("order",), ()]:
        for _ in range(3):
            g = ts.random_element(gen, symmetries=sym)
            wg = ts.apply(w, g)
            assert not _same(wg, w)
            assert (_out(model, wg, x) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("oblivious", KINDS)
@pytest.mark.parametrize("kw", [{"step": "erf", "alpha": 1.7}, {"reduction": "sum"}])
def test_function_preserved_with_erf_step_and_sum(oblivious, kw):
    model, x, w, ts = _ensemble(oblivious, 3, **kw)
    ref = _out(model, w, x)
    for seed in range(3):
        wg = ts.apply(w, ts.random_element(torch.Generator().manual_seed(seed)))
        assert (_out(model, wg, x) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("oblivious", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_group_laws(oblivious, depth):
    _, _, w, ts = _ensemble(oblivious, depth)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        g, h = ts.random_element(gen), ts.random_element(gen)
        assert _same(ts.apply(ts.apply(w, g), ts.invert(g)), w)
        assert _same(ts.apply(ts.apply(w, g), h), ts.apply(w, ts.compose(g, h)))
        e = ts.compose(g, ts.invert(g))
        assert _same(e, ts.identity())
    assert _same(ts.apply(w, ts.identity()), w)


def test_apply_with_leading_batch_axes():
    _, _, w, ts = _ensemble(True, 3)
    g = ts.random_element(torch.Generator().manual_seed(1))
    stacked = {k: torch.stack([v, 2 * v]) for k, v in w.items()}
    out = ts.apply(stacked, g)
    single = ts.apply(w, g)
    for k in w:
        assert torch.equal(out[k][0], single[k]) and torch.equal(out[k][1], 2 * single[k])


# --------------------------------------------------------------------------- the three symmetries
@pytest.mark.parametrize("oblivious", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_each_symmetry_present_with_its_hand_count(oblivious, depth):
    trees = 4
    model, x, w, ts = _ensemble(oblivious, depth, trees=trees)
    (lay,) = ts.layouts
    n_split = depth if oblivious else 2**depth - 1
    counts = ts.counts()[lay.weight]
    assert counts == {
        "trees": trees,
        "flip_bits": trees * n_split,
        "level_orders_per_tree": math.factorial(depth) if oblivious else 1,
    }
    # 1. the tree permutation: one ordinary WeightSpace group of size M on axis 0 of all
    # three tensors, found by tracing
    assert list(ts.space.groups) == [lay.group]
    assert ts.space.groups[lay.group].size == trees
    assert sorted(ts.space.tensors_of(lay.group)) == ["leaf", "split_bias", "split_weight"]
    ref = _out(model, w, x)
    # 2. every flip bit on its own moves the weights and keeps the function
    for m, n in itertools.product(range(trees), range(n_split)):
        g = ts.identity()
        g[lay.flip_key][m, n] = True
        wg = ts.apply(w, g)
        assert not _same(wg, w)
        assert (_out(model, wg, x) - ref).abs().max() < 1e-12
    # 2+3. the per-tree group acts freely: flips (and level orders) of one tree give
    # 2^(2^D - 1) (non-oblivious) or 2^D·D! (oblivious) distinct trees, all equivalent.
    # All at once: P copies of tree 0 in a P-tree ensemble, copy p under pattern p.
    orders = list(itertools.permutations(range(depth))) if lay.has_order else [None]
    patterns = list(itertools.product(itertools.product((False, True), repeat=n_split), orders))
    big = SoftTreeEnsemble(4, 3, len(patterns), depth, oblivious=oblivious, dtype=F64)
    big_ts = TreeSpace.from_module(big, x[:2])
    g = big_ts.identity()
    g[lay.flip_key] = torch.tensor([bits for bits, _ in patterns])
    if lay.has_order:
        g[lay.order_key] = torch.tensor([order for _, order in patterns])
    copies = {k: v[:1].expand(len(patterns), *v.shape[1:]).clone() for k, v in w.items()}
    big.load_state_dict(big_ts.apply(copies, g))
    with torch.no_grad():
        per_tree = torch.einsum("bml,mlc->bmc", big.leaf_probabilities(x), big.leaf)
    assert (per_tree - per_tree[:, :1]).abs().max() < 1e-12
    images = {tuple(r) for r in torch.cat([p.flatten(1) for p in big.parameters()], 1).tolist()}
    assert len(images) == len(patterns)
    expected = 2**depth * math.factorial(depth) if oblivious else 2 ** (2**depth - 1)
    assert len(patterns) == expected
    want = math.lgamma(trees + 1) / math.log(10) + trees * math.log10(
        2**n_split * (math.factorial(depth) if oblivious else 1)
    )
    assert ts.group_order_log10() == pytest.approx(want)


def test_converter_finds_the_tree_group_cleanly_and_json_round_trips():
    for oblivious in (False, True):
        model = SoftTreeEnsemble(6, 2, 9, 3, oblivious=oblivious)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            space = from_module(model, torch.randn(3, 6))
        (group,) = space.groups.values()
        assert group.size == 9
        for t in space.tensors.values():
            assert t.axes[0].groups == (group.name,)
            assert all(a.is_fixed for a in t.axes[1:])
        back = WeightSpace.from_json(space.to_json())
        assert back == space
        ts = TreeSpace.from_space(back)
        assert ts.layouts == TreeSpace.from_module(model, torch.randn(3, 6)).layouts
        assert ts.layouts[0].oblivious is oblivious and ts.layouts[0].depth == 3


def test_nested_ensemble_and_bad_elements():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trees = SoftTreeEnsemble(4, 2, 6, 2, oblivious=True, dtype=F64)

        def forward(self, x):
            return self.trees(x).tanh()

    model = Head()
    x = torch.randn(8, 4, dtype=F64)
    ts = TreeSpace.from_module(model, x)
    (lay,) = ts.layouts
    assert lay.weight == "trees.split_weight" and lay.flip_key == "trees.split_weight:flip"
    w = {k: v.detach() for k, v in model.state_dict().items()}
    g = ts.random_element(torch.Generator().manual_seed(0))
    assert (_out(model, ts.apply(w, g), x) - _out(model, w, x)).abs().max() < 1e-12
    bad = dict(g)
    bad[lay.flip_key] = g[lay.flip_key].long()
    with pytest.raises(WeightSpaceError, match="bool"):
        ts.apply(w, bad)
    bad = dict(g)
    bad[lay.order_key] = torch.zeros_like(g[lay.order_key])
    with pytest.raises(WeightSpaceError, match="permutation"):
        ts.apply(w, bad)
    bad = {k: v for k, v in g.items() if k != lay.order_key}
    with pytest.raises(WeightSpaceError, match="order"):
        ts.invert(bad)


# --------------------------------------------------------------------------- matching
@pytest.mark.parametrize("oblivious", KINDS)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_matching_recovers_a_permuted_flipped_copy(oblivious, depth, noise):
    model, x, a, ts = _ensemble(oblivious, depth, trees=32, f=6)
    gen = torch.Generator().manual_seed(3)
    noisy = {
        k: v + noise * v.std() * torch.randn(v.shape, generator=gen, dtype=F64)
        for k, v in a.items()
    }
    g = ts.random_element(gen)
    b = ts.apply(noisy, g)
    found = match_trees(ts, a, b)
    assert _same(found, ts.invert(g))  # the exact element: trees, flips and orders
    back = ts.apply(b, found)
    if noise == 0:
        assert _same(back, a)
    else:
        assert all((back[k] - a[k]).abs().max() < 0.1 * a[k].abs().max() for k in a)
    # b still computes its function after alignment
    assert (_out(model, back, x) - _out(model, noisy, x)).abs().max() < 1e-12


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_flip_dynamic_program_equals_the_papers_enumeration(depth):
    _, _, a, ts = _ensemble(False, depth, trees=12, seed=1)
    _, _, b, _ = _ensemble(False, depth, trees=12, seed=2)
    (lay,) = ts.layouts
    dp, _ = tree_similarity(lay, a, b, method="dp")
    dp_blocked, _ = tree_similarity(lay, a, b, method="dp", block=16)
    enum, _ = tree_similarity(lay, a, b, method="enumerate")
    assert torch.allclose(dp, enum, rtol=0, atol=1e-12)
    assert torch.allclose(dp, dp_blocked, rtol=0, atol=1e-12)
    assert _same(match_trees(ts, a, b, method="dp"), match_trees(ts, a, b, method="enumerate"))
    # the chosen flips reach the pair's best similarity
    g = match_trees(ts, a, b)
    bb = ts.apply(b, g)
    flat = lambda w: torch.cat([w[t].flatten(1) for t in (lay.weight, lay.bias, lay.leaf)], 1)  # noqa: E731
    assert torch.allclose((flat(a) * flat(bb)).sum(1), dp[torch.arange(12), g[lay.group]])


@pytest.mark.parametrize("oblivious", KINDS)
def test_permutation_only_matching_is_weight_matching_on_the_weight_space(oblivious):
    _, _, a, ts = _ensemble(oblivious, 2, trees=24, seed=1)
    _, _, b, _ = _ensemble(oblivious, 2, trees=24, seed=2)
    (lay,) = ts.layouts
    ours = match_trees(ts, a, b, symmetries=())
    generic = weight_matching(ts.space, a, b)
    assert torch.equal(ours[lay.group], generic[lay.group])
    assert not ours[lay.flip_key].any()
    # the tree symmetries find a better objective than permutations alone
    s_perm, _ = tree_similarity(lay, a, b, symmetries=())
    s_full, _ = tree_similarity(lay, a, b)
    assert (s_full >= s_perm - 1e-12).all() and (s_full > s_perm).any()


def test_metanet_align_and_merge_on_tree_checkpoints(tmp_path):
    from metanet.cli import main
    from metanet.io import load, save

    model = SoftTreeEnsemble(5, 3, 12, 2, oblivious=True)
    space = from_module(model, torch.randn(2, 5))
    a = {k: v.detach() for k, v in model.state_dict().items()}
    b = space.apply(a, space.random_element(torch.Generator().manual_seed(0)))
    save(tmp_path / "a.safetensors", a, space)
    save(tmp_path / "b.safetensors", b, space)
    assert main(["align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "-o", str(tmp_path / "b2.safetensors"), "-q"]) == 0  # fmt: skip
    aligned, _ = load(tmp_path / "b2.safetensors")
    assert _same(dict(aligned), a)
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--method", "align", "-o", str(tmp_path / "m.safetensors"), "-q"]) == 0  # fmt: skip
    merged, _ = load(tmp_path / "m.safetensors")
    assert all(torch.allclose(merged[k], a[k]) for k in a)


# --------------------------------------------------------------------------- barriers
def test_barrier_ordering_on_wine():
    """Tree symmetries < permutation < none (test loss barrier), both kinds of tree: a
    small version of benchmarks/trees.py (64 trees, 20 epochs, one pair)."""
    data = load_tabular("wine", seed=0)
    for oblivious in (False, True):
        models = []
        for k in range(2):
            torch.manual_seed(10 * k + 1)
            m = SoftTreeEnsemble(13, 3, 64, 2, oblivious=oblivious)
            models.append(train(m, data, epochs=20, lr=1e-2, seed=k))
        wa, wb = ({k: v.detach() for k, v in m.state_dict().items()} for m in models)
        ts = TreeSpace.from_module(models[0], data.x_train[:2])
        barrier = {}
        for label, sym in (("none", None), ("perm", ()), ("tree", ("flip", "order"))):
            w2 = wb if sym is None else ts.apply(wb, match_trees(ts, wa, wb, sym))
            r = interpolation(models[0], wa, w2, data.x_test, data.y_test, data.task)
            barrier[label] = r["loss_barrier"]
        assert barrier["tree"] < barrier["perm"] < barrier["none"], (oblivious, barrier)
        assert barrier["tree"] < 0.75 * barrier["perm"] and barrier["perm"] < 0.3 * barrier["none"]


def test_metanet_align_undoes_flips_and_level_orders(tmp_path, capsys):
    """The CLI (the checkpoint engine) matches tree checkpoints with all three symmetries:
    a copy permuted, flipped and reordered comes back exactly, oblivious or not, and the
    merge of the pair is the model itself."""
    from metanet.cli import main
    from metanet.io import load, save

    for oblivious in (False, True):
        torch.manual_seed(3)
        model = SoftTreeEnsemble(5, 3, 12, 2, oblivious=oblivious).double()
        ts = TreeSpace.from_module(model, torch.randn(2, 5, dtype=torch.float64))
        a = {k: v.detach() for k, v in model.state_dict().items()}
        b = ts.apply(a, ts.random_element(torch.Generator().manual_seed(1)))
        assert not _same(b, a)
        pa, pb = tmp_path / f"a{oblivious}.safetensors", tmp_path / f"b{oblivious}.safetensors"
        save(pa, a, ts.space)
        save(pb, b, ts.space)
        out = tmp_path / f"b2{oblivious}.safetensors"
        assert main(["align", str(pa), str(pb), "-o", str(out)]) == 0
        assert "tree matching" in capsys.readouterr().err
        aligned, _ = load(out)
        assert _same(dict(aligned), a)
        merged = tmp_path / f"m{oblivious}.safetensors"
        assert main(["merge", str(pa), str(pb), "--method", "align", "-o", str(merged), "-q"]) == 0
        got, _ = load(merged)
        assert all(torch.allclose(got[k], a[k], rtol=0, atol=1e-12) for k in a)
