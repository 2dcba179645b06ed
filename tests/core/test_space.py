"""WeightSpace: group laws, validation, serialization, on hand-built and converted spaces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from converters import from_state_dict
from metanet import Axis, Group, NeuronSet, TensorSpec, WeightSpace, WeightSpaceError
from tests.fixtures.zoo import family_models
from tests.helpers import attention_space


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Attention(torch.nn.Module):
    def __init__(self, d: int = 12, heads: int = 3, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.embed = torch.nn.Parameter(torch.randn(5, d))
        if fused:
            self.qkv = torch.nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.o = torch.nn.Linear(d, d)
        self.unembed = torch.nn.Parameter(torch.randn(4, d))

    def forward(self, tokens):
        x = tokens @ self.embed  # (B, L, d) from one-hot-ish token mixtures
        B, L, d = x.shape
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        split = lambda t: t.view(B, L, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, L, d)
        x = x + self.o(y)
        return x @ self.unembed.T


def grouped_conv_space(groups: int = 3, per: int = 4) -> WeightSpace:
    """conv1 -> grouped conv2 (groups) -> conv3: channel groups permute as blocks, and each
    block permutes its own channels; conv2's per-group input axis is indexed from its
    output axis (a group indexed across axes of one tensor)."""
    c = groups * per
    gs = [
        Group("blocks", groups),
        Group("c1", per, within="blocks"),
        Group("c2", per, within="blocks"),
    ]
    a1 = Axis.product(("blocks", groups), ("c1", per))
    a2 = Axis.product(("blocks", groups), ("c2", per))
    ts = [
        TensorSpec("conv1.weight", (c, 2, 3, 3), (a1, Axis.fixed(2), Axis.fixed(3), Axis.fixed(3))),
        TensorSpec("conv1.bias", (c,), (a1,), role="bias"),
        TensorSpec(
            "conv2.weight", (c, per, 3, 3), (a2, Axis.of("c1", per), Axis.fixed(3), Axis.fixed(3))
        ),
        TensorSpec("conv2.bias", (c,), (a2,), role="bias"),
        TensorSpec("conv3.weight", (5, c, 1, 1), (Axis.fixed(5), a2, Axis.fixed(1), Axis.fixed(1))),
    ]
    return WeightSpace.build(gs, ts)


class GroupedConvNet(torch.nn.Module):
    def __init__(self, groups: int = 3, per: int = 4):
        super().__init__()
        c = groups * per
        self.conv1 = torch.nn.Conv2d(2, c, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.conv3 = torch.nn.Conv2d(c, 5, 1, bias=False)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


HAND_SPACES = {
    "attention": (attention_space, Attention, lambda: torch.randn(2, 6, 5)),
    "attention_fused": (
        lambda: attention_space(fused=True),
        lambda: Attention(fused=True),
        lambda: torch.randn(2, 6, 5),
    ),
    "grouped_conv": (grouped_conv_space, GroupedConvNet, lambda: torch.randn(2, 2, 6, 6)),
}


def all_spaces():
    out = [
        (name, from_state_dict(m.state_dict(), fam), m.state_dict())
        for name, fam, m, _ in family_models()
    ]
    for name, (make_space, make_model, _) in HAND_SPACES.items():
        torch.manual_seed(0)
        m = make_model()
        out.append((name, make_space(), {k: v for k, v in m.state_dict().items()}))
    return out


@pytest.mark.parametrize(
    "name,space,weights", all_spaces(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_group_laws(name, space, weights):
    gen = torch.Generator().manual_seed(1)
    e = space.identity()
    assert _equal(space.apply(weights, e), weights)
    for _ in range(5):
        g, h = space.random_element(gen), space.random_element(gen)
        gw = space.apply(weights, g)
        assert _equal(space.apply(gw, space.invert(g)), weights)
        assert _equal(space.apply(gw, h), space.apply(weights, space.compose(g, h)))
        assert _equal(space.compose(g, space.invert(g)), e)
        assert _equal(space.compose(space.invert(g), g), e)


@pytest.mark.parametrize("name", list(HAND_SPACES))
def test_hand_spaces_preserve_function(name):
    from metanet.testing import assert_function_preserved

    make_space, make_model, make_input = HAND_SPACES[name]
    torch.manual_seed(0)
    model, x = make_model(), make_input()
    space = make_space()
    assert assert_function_preserved(model, space, x, n=20, atol=1e-10) < 1e-10


def test_wreath_is_used():
    """Different heads really get different within-head permutations."""
    space = attention_space(d=32, heads=4)
    g = space.random_element(torch.Generator().manual_seed(0))
    assert g["qk"].shape == (4, 8)
    assert len({tuple(r.tolist()) for r in g["qk"]}) > 1


def test_random_element_is_seeded():
    space = attention_space()
    a = space.random_element(torch.Generator().manual_seed(3))
    b = space.random_element(torch.Generator().manual_seed(3))
    assert _equal(a, b)


def test_apply_with_leading_batch_axes():
    _, space, w = all_spaces()[0]
    feats = {k: v.expand(4, 2, *v.shape).clone() for k, v in w.items()}
    g = space.random_element(torch.Generator().manual_seed(0))
    out = space.apply(feats, g)
    single = space.apply(w, g)
    for k in w:
        assert torch.equal(out[k][3, 1], single[k])


def test_json_round_trip_and_equality():
    for _, space, _ in all_spaces():
        again = WeightSpace.from_json(space.to_json())
        assert again == space
        assert again.to_json() == space.to_json()
    a = all_spaces()[0][1]
    b = all_spaces()[1][1]
    assert a != b


def test_from_json_rejects_garbage():
    with pytest.raises(WeightSpaceError, match="malformed"):
        WeightSpace.from_json("{not json")
    with pytest.raises(WeightSpaceError, match="not a metanet WeightSpace"):
        WeightSpace.from_json('{"format": "other"}')


def test_summary_lists_groups_sizes_and_tensors():
    space = from_state_dict(family_models()[0][2].state_dict(), "mlp")
    text = space.summary()
    assert "2 groups" in text and "56 free permutation dims" in text
    assert "layers.0" in text and "32" in text and "layers.2.weight" in text
    assert "positive_scale" in text


def test_validate_names_tensor_and_axis():
    _, space, w = all_spaces()[0]
    bad = dict(w)
    bad["layers.2.weight"] = torch.zeros(24, 31)
    with pytest.raises(WeightSpaceError, match=r"'layers.2.weight' axis 1 .* size 31, expected 32"):
        space.validate(bad)
    missing = dict(w)
    del missing["layers.0.bias"]
    with pytest.raises(WeightSpaceError, match="lack tensor 'layers.0.bias'"):
        space.validate(missing)
    extra = dict(w, stray=torch.zeros(1))
    with pytest.raises(WeightSpaceError, match="'stray'"):
        space.validate(extra)
    space.validate(extra, strict=False)
    wrong_rank = dict(w)
    wrong_rank["layers.0.bias"] = torch.zeros(32, 1)
    with pytest.raises(WeightSpaceError, match="'layers.0.bias' has 2 axes"):
        space.validate(wrong_rank)


def test_inconsistent_spaces_are_rejected():
    with pytest.raises(WeightSpaceError, match="axis 0: spec h:4 has size 4, shape says 5"):
        WeightSpace.build([Group("h", 4)], [TensorSpec("w", (5,), (Axis.of("h", 4),))])
    with pytest.raises(WeightSpaceError, match="unknown group 'g'"):
        WeightSpace.build([], [TensorSpec("w", (4,), (Axis.of("g", 4),))])
    with pytest.raises(WeightSpaceError, match="group 'h' has size 3, factor says 4"):
        WeightSpace.build([Group("h", 3)], [TensorSpec("w", (4,), (Axis.of("h", 4),))])
    with pytest.raises(WeightSpaceError, match="indexed by 'heads'"):
        WeightSpace.build(
            [Group("heads", 2), Group("d", 3, within="heads")],
            [TensorSpec("w", (3,), (Axis.of("d", 3),))],
        )
    with pytest.raises(WeightSpaceError, match="neuron set 'b'"):
        WeightSpace.build(
            [Group("h", 4)],
            [
                TensorSpec(
                    "w",
                    (4, 4),
                    (Axis.of("h", 4), Axis.fixed(4)),
                    out_set="a",
                    out_axis=0,
                    in_set="b",
                    in_axis=1,
                )
            ],
            [NeuronSet("a", Axis.of("h", 4)), NeuronSet("b", Axis.of("h", 4))],
        )


def test_bad_element_is_rejected():
    _, space, w = all_spaces()[0]
    g = space.random_element()
    g["layers.0"] = g["layers.0"][:-1]
    with pytest.raises(WeightSpaceError, match=r"element\['layers.0'\] has shape \(31,\)"):
        space.apply(w, g)


# ---- property test: random factor structures obey the group laws ---------------------------


@st.composite
def random_spaces(draw):
    n_groups = draw(st.integers(1, 3))
    groups = [Group(f"g{i}", draw(st.integers(1, 4))) for i in range(n_groups)]
    outer = groups[0]
    groups.append(Group("inner", draw(st.integers(1, 3)), within=outer.name))
    tensors = []
    for t in range(draw(st.integers(1, 3))):
        axes = []
        for _ in range(draw(st.integers(1, 3))):
            segs = []
            for _ in range(draw(st.integers(1, 2))):
                kind = draw(st.sampled_from(["fixed", "group", "wreath"]))
                if kind == "fixed":
                    segs.append(((None, draw(st.integers(1, 3))),))
                elif kind == "group":
                    g = draw(st.sampled_from(groups[:-1]))
                    segs.append(((g.name, g.size),))
                else:
                    segs.append(((outer.name, outer.size), ("inner", groups[-1].size)))
            axes.append(Axis(tuple(tuple(Axis.product(*s).segments[0]) for s in segs)))
        shape = tuple(a.size for a in axes)
        tensors.append(TensorSpec(f"t{t}", shape, tuple(axes)))
    return WeightSpace.build(groups, tensors)


@settings(max_examples=60, deadline=None)
@given(random_spaces(), st.integers(0, 2**31 - 1))
def test_group_laws_property(space, seed):
    gen = torch.Generator().manual_seed(seed)
    w = {name: torch.randn(t.shape, generator=gen) for name, t in space.tensors.items()}
    g, h = space.random_element(gen), space.random_element(gen)
    gw = space.apply(w, g)
    assert _equal(space.apply(gw, space.invert(g)), w)
    assert _equal(space.apply(gw, h), space.apply(w, space.compose(g, h)))
    assert WeightSpace.from_json(space.to_json()) == space
