"""Norm-induced scale invariance: found by the converter, exact by scaling (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from converters import from_module
from metanet import WeightSpace
from metanet.space import NormScale, WeightSpaceError
from tests.fixtures.architectures import entry
from tests.helpers import converted


def _zero_eps(model: nn.Module) -> nn.Module:
    """The invariance is exact at eps = 0 (with eps it holds to O(eps / var))."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(getattr(m, "eps", None), float):
            m.eps = 0.0
    return model


def _scaled(space: WeightSpace, weights: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    for ns in space.norm_scales:
        s = torch.rand(ns.size, generator=gen, dtype=torch.float64) * 3.0 + 0.2
        weights = ns.apply(weights, s)
    return weights


def _rel(model, a, b, x) -> float:
    ya, yb = functional_call(model, a, x), functional_call(model, b, x)
    return float((ya - yb).abs().max() / ya.abs().max())


# (sets, per-channel sets, dims): hand counts
HAND = {
    # 19 convs + 2 shortcut convs, each followed by its BatchNorm: one scale per channel,
    # 16 + 6x16 + (6x32 + 32) + (6x64 + 64) = 784
    "resnet20": (21, 21, 784),
    # the residual stream (patch embedding, class token, positions, both blocks' attention
    # projections and MLP outputs) is read only by LayerNorms: one scale for all of it
    "vit_tiny": (1, 0, 1),
    # every conv feeds a BatchNorm: stem 16 + block 1 (dw 16, proj 8) + blocks 2-5
    # (expand, dw, proj: 32+32+16, 64+64+16, 64+64+24, 96+96+24) + last 1x1 64 = 696
    "mobilenet_v2_like": (16, 16, 696),
    # per-pixel LayerNorm over channels: each conv scales as a whole
    "resnet20_layernorm": (21, 0, 21),
}


@pytest.mark.parametrize("name", list(HAND))
def test_found_with_hand_counts_and_exact_by_scaling(name):
    model, inputs, space = converted(entry(name))
    sets, per_channel, dims = HAND[name]
    assert len(space.norm_scales) == sets
    assert sum(ns.size > 1 for ns in space.norm_scales) == per_channel
    assert space.norm_scale_dims() == dims
    w = dict(model.state_dict())
    scaled = _scaled(space, w)
    changed = [k for k in w if not torch.equal(w[k], scaled[k])]
    assert len(changed) == sum(len(ns.members) for ns in space.norm_scales)
    assert _rel(_zero_eps(model), w, scaled, inputs) < 1e-12
    # with the real eps the function moves, a little: the invariance is eps-exact only
    assert 0 < _rel(model, w, scaled, inputs) < 1e-2


def test_vit_stream_members():
    _, _, space = converted(entry("vit_tiny"))
    (ns,) = space.norm_scales
    names = {m[0] for m in ns.members}
    assert {"patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed"} <= names
    for b in (0, 1):
        assert {f"blocks.{b}.attn.proj.weight", f"blocks.{b}.mlp.2.bias"} <= names
        assert f"blocks.{b}.attn.qkv.weight" not in names  # read after a norm, not before
    assert "head.weight" not in names and len(names) == 12
    assert set(ns.norms) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1"} | {
        "blocks.1.norm2",
        "norm",
    }


def test_scaling_a_non_member_changes_the_function():
    """The test above can fail: the classifier (no norm after it) is not invariant."""
    model, inputs, space = converted(entry("resnet20"))
    assert all(m[0] != "fc.weight" for ns in space.norm_scales for m in ns.members)
    w = dict(model.state_dict())
    w2 = dict(w, **{"fc.weight": 2.0 * w["fc.weight"]})
    assert _rel(_zero_eps(model), w, w2, inputs) > 1e-3


class _Leaky(nn.Module):
    """conv1 -> BN, but conv1's output is also read by conv2 directly: not invariant.
    conv3 -> ReLU -> BN is (ReLU is positively homogeneous)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv1(x)
        y = self.bn1(h) + self.conv2(h)
        return self.bn3(torch.relu(self.conv3(y)))


def test_a_value_read_outside_the_norm_is_not_invariant():
    torch.manual_seed(0)
    model = _Leaky().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    space = from_module(model, x)
    (ns,) = space.norm_scales
    assert [m[0] for m in ns.members] == [
        "conv3.weight",
        "conv3.bias",
        "bn3.running_mean",
        "bn3.running_var",
    ]
    assert [m[2] for m in ns.members] == [1, 1, 1, 2] and ns.size == 4
    w = dict(model.state_dict())
    assert _rel(_zero_eps(model), w, _scaled(space, w), x) < 1e-12


def test_json_round_trip_and_old_documents():
    _, _, space = converted(entry("mobilenet_v2_like"))
    back = WeightSpace.from_json(space.to_json())
    assert back == space and back.norm_scales == space.norm_scales
    _, _, mlp = converted(entry("mlp"))
    assert not mlp.norm_scales and "norm_scales" not in mlp.to_dict()  # format unchanged
    d = space.to_dict()
    d.pop("norm_scales")
    assert WeightSpace.from_dict(d).norm_scales == ()


def test_invalid_norm_scales_name_the_tensor():
    _, _, space = converted(entry("cnn_bn"))
    ns = space.norm_scales[0]
    bad = NormScale(ns.name, ns.size + 1, ns.members)
    with pytest.raises(WeightSpaceError, match=ns.members[0][0]):
        WeightSpace(space.groups, space.tensors, space.neuron_sets, norm_scales=(bad,))
    with pytest.raises(WeightSpaceError, match="unknown tensor 'nope'"):
        WeightSpace(
            space.groups,
            space.tensors,
            space.neuron_sets,
            norm_scales=(NormScale("x", 1, (("nope", None, 1),)),),
        )
    with pytest.raises(WeightSpaceError, match="expected"):
        ns.apply(dict.fromkeys(space.tensors, torch.ones(1)), torch.ones(ns.size + 2))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("size", 2.5, r"norm_scales\['{n}'\]\.size must be an integer, got 2\.5"),
        ("size", -1, r"norm_scales\['{n}'\]\.size must be a size"),
        ("members", "conv", r"norm_scales\['{n}'\]\.members must be a list"),
        ("members", [["w", 0]], r"norm_scales\['{n}'\]\.members\[0\] must be a \[tensor"),
        ("members", [[3, 0, 1]], r"norm_scales\['{n}'\]\.members\[0\]\[0\] must be a string"),
        ("members", [["w", "0", 1]], r"norm_scales\['{n}'\]\.members\[0\]\[1\] must be an int"),
        ("members", [["w", 0, 1.0]], r"norm_scales\['{n}'\]\.members\[0\]\[2\] must be an int"),
        ("members", [["w", True, 1]], r"norm_scales\['{n}'\]\.members\[0\]\[1\] must be an int"),
        ("norms", "bn", r"norm_scales\['{n}'\]\.norms must be a list"),
        ("norms", [1], r"norm_scales\['{n}'\]\.norms\[0\] must be a string"),
    ],
)
def test_json_schema_names_the_norm_scale_and_field(field, value, message):
    import json
    import re

    _, _, space = converted(entry("cnn_bn"))
    d = json.loads(space.to_json())
    name = next(iter(d["norm_scales"]))
    d["norm_scales"][name][field] = value
    with pytest.raises(WeightSpaceError, match=message.format(n=re.escape(name))):
        WeightSpace.from_json(json.dumps(d))


def test_json_schema_norm_scales_shape():
    import json

    _, _, space = converted(entry("cnn_bn"))
    d = json.loads(space.to_json())
    name = next(iter(d["norm_scales"]))
    for doc, message in [
        ({**d, "norm_scales": [1]}, "norm_scales must be an object"),
        ({**d, "norm_scales": {name: 3}}, f"norm_scales\\['{name}'\\] must be an object"),
        ({**d, "norm_scales": {name: {"size": 1}}}, "lacks 'members'"),
    ]:
        with pytest.raises(WeightSpaceError, match=message):
            WeightSpace.from_json(json.dumps(doc))
    # the valid document still parses (norms optional)
    d["norm_scales"][name].pop("norms")
    assert WeightSpace.from_json(json.dumps(d)).norm_scales[0].norms == ()


# ----------------------------------------------------------------- teleport and optimizer


def _digits_cnn():
    from tasks.datasets import digits

    torch.manual_seed(0)
    data = digits.load()
    model = digits.small_cnn(8, norm="batch")
    space = from_module(model, (data.x_train[:4],))
    return model, space, data


@pytest.mark.slow  # ~50 s on two loaded cores: double backward through a BN CNN
def test_teleport_norm_actions_raise_the_gradient_and_keep_the_loss():
    from tasks.optim.teleport import group_actions, teleport

    model, space, data = _digits_cnn()
    acts = group_actions(model, space, data.x_train[:8], kinds=("norm",))
    assert [a.group for a in acts] == [ns.name for ns in space.norm_scales] and not acts.notes
    assert all(a.kind == "norm" and a.size > 1 for a in acts)
    batch = (data.x_train[:128], data.y_train[:128])
    res = teleport(model, space, batch, actions=acts, steps=5, lr=0.1)
    assert res.accepted, res.reason
    assert res.objective_after > 1.2 * res.objective_before
    assert abs(res.loss_after - res.loss_before) <= 1e-4 * max(1.0, res.loss_before)
    # the conv rows moved (scaled), the classifier did not
    w0 = model.state_dict()
    assert not torch.equal(res.weights["0.weight"], w0["0.weight"])
    assert torch.equal(res.weights["11.weight"], w0["11.weight"])


def test_norm_projected_removes_exactly_the_radial_part():
    from tasks.optim.scale_invariant import NormProjected

    model, space, data = _digits_cnn()
    model.train()
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt = NormProjected(inner, model, space)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        for m, o in ((model, opt), (twin, twin_opt)):
            loss = nn.functional.cross_entropy(m(data.x_train[:64]), data.y_train[:64])
            o.zero_grad()
            loss.backward()
            o.step()
        after = dict(model.named_parameters())
        members = {n for _, ms in opt.units for n, _ in ms}
        assert members == {"0.weight", "3.weight", "6.weight"}  # the three bias-free convs
        for name, p in twin.named_parameters():
            same = torch.equal(after[name], p)
            assert same == (name not in members), name  # only the members are projected
        for _, ((name, axis),) in opt.units:
            assert axis == 0
            w = before[name].flatten(1)
            d = (after[name].detach() - before[name]).flatten(1)
            # row by row (one conv channel each): no component along the old weights
            assert ((d * w).sum(1).abs() / (d.norm(dim=1) * w.norm(dim=1))).max() < 1e-5
            assert d.abs().min(dim=1).values.max() > 0
        twin.load_state_dict(model.state_dict())  # same start for the next step


class _Shifted(nn.Module):
    """conv -> +1 -> BN: the constant breaks homogeneity (s x + 1 != s (x + 1))."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) + 1.0)


def test_a_constant_added_before_the_norm_is_not_invariant():
    torch.manual_seed(0)
    model = _Shifted().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert from_module(model, x).norm_scales == ()
    # and indeed: scaling the conv changes the output
    w = dict(model.state_dict())
    w2 = dict(w, **{"conv.weight": 2.0 * w["conv.weight"]})
    assert _rel(_zero_eps(model), w, w2, x) > 1e-3


def test_derived_spaces_keep_their_norm_scales():
    """WeightSpace is immutable; ``replace`` derives one and carries ``norm_scales`` (a
    space rebuilt field by field used to drop them: probe features, imported zoos)."""
    import dataclasses

    from metanet.probe import probe_space

    _, _, space = converted(entry("cnn_bn"))
    assert space.norm_scales
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.notes = ("changed",)
    derived = space.replace(notes=("a note",))
    assert derived.norm_scales == space.norm_scales and derived.notes == ("a note",)
    import torch

    from metanet.probe import PROBE_PREFIX

    first = next(iter(space.neuron_sets))
    n = space.neuron_sets[first].axis.size
    feats = {f"{PROBE_PREFIX}{first}": torch.zeros(2, n, 4)}
    assert probe_space(space, feats).norm_scales == space.norm_scales
