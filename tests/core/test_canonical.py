"""Sign canonicalization: invariant under sign flips, equivariant under permutations,
function-preserving (float64), on SIRENs, tanh MLPs and a tanh CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from converters import from_module
from metanet import (
    Axis,
    Group,
    TensorSpec,
    WeightSpace,
    apply_signs,
    canonicalize_sign,
    random_signs,
    sign_groups,
)
from metanet.canonical import _coords
from tasks.datasets.inr import INRConfig, Siren, image_grid, siren_space


def _siren():
    cfg = INRConfig(hidden=16, depth=3)
    torch.manual_seed(0)
    model = Siren(cfg).double()
    for p in model.parameters():  # trained INRs have non-zero biases
        p.data.add_(0.1 * torch.randn_like(p))
    return model, siren_space(cfg), image_grid(8, 8).double()


def _tanh_mlp(bias: bool = True):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 8, bias=bias),
        nn.Tanh(),
        nn.Linear(8, 7, bias=bias),
        nn.Tanh(),
        nn.Linear(7, 6, bias=bias),
        nn.Tanh(),
        nn.Linear(6, 2, bias=bias),
    ).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    return model, from_module(model, (x,)), x


def _tanh_cnn():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 5, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3),
    ).double()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    return model, from_module(model, (x,)), x


CASES = {
    "siren": _siren,
    "tanh_mlp": _tanh_mlp,
    "tanh_mlp_nobias": lambda: _tanh_mlp(False),
    "tanh_cnn": _tanh_cnn,
}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_invariant_equivariant_and_function_preserving(case):
    model, space, x = CASES[case]()
    groups = sign_groups(space)
    assert groups and len(groups) == len(space.groups)  # every hidden layer: tanh / sin
    w = _state(model)
    canon, signs = canonicalize_sign(w, space, return_signs=True)
    assert set(signs) == set(groups)
    assert any(bool((s < 0).any()) for s in signs.values())  # it did flip something
    torch.testing.assert_close(apply_signs(w, space, signs), canon, rtol=0, atol=0)
    # the function is kept
    torch.testing.assert_close(functional_call(model, canon, (x,)), model(x))
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        flipped = apply_signs(w, space, random_signs(space, gen))
        assert not all(torch.equal(flipped[k], w[k]) for k in w)
        torch.testing.assert_close(functional_call(model, flipped, (x,)), model(x))
        # invariant under sign flips
        torch.testing.assert_close(canonicalize_sign(flipped, space), canon, rtol=0, atol=0)
        # equivariant under permutations (and so under the whole group)
        g = space.random_element(gen)
        both = space.apply(flipped, g)
        torch.testing.assert_close(
            canonicalize_sign(both, space), space.apply(canon, g), rtol=0, atol=0
        )
    # canonical weights are a fixed point
    torch.testing.assert_close(canonicalize_sign(canon, space), canon, rtol=0, atol=0)


def test_batched_matches_one_by_one():
    model, space, _ = _siren()
    w = _state(model)
    gen = torch.Generator().manual_seed(4)
    batch = [apply_signs(w, space, random_signs(space, gen)) for _ in range(4)]
    batch = [
        {k: v + 0.01 * i * torch.randn_like(v) for k, v in b.items()} for i, b in enumerate(batch)
    ]
    stacked = {k: torch.stack([b[k] for b in batch]) for k in w}
    out = canonicalize_sign(stacked, space)
    for i, b in enumerate(batch):
        one = canonicalize_sign(b, space)
        for k in w:
            torch.testing.assert_close(out[k][i], one[k], rtol=0, atol=0)
    # batched signs flip each member on its own
    signs = random_signs(space, gen, batch=(4,))
    flipped = apply_signs(stacked, space, signs)
    for i, b in enumerate(batch):
        one = apply_signs(b, space, {g: s[i] for g, s in signs.items()})
        for k in w:
            torch.testing.assert_close(flipped[k][i], one[k], rtol=0, atol=0)


def test_canonical_siren_renders_the_same_image():
    model, space, coords = _siren()
    canon = canonicalize_sign(_state(model), space)
    img = model(coords)
    torch.testing.assert_close(
        functional_call(model, canon, (coords,)), img, rtol=1e-12, atol=1e-12
    )


def test_groups_without_sign_are_left_alone():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    space = from_module(model, (torch.randn(2, 3),))
    assert sign_groups(space) == []
    w = _state(model)
    out = canonicalize_sign(w, space)
    for k in w:
        assert torch.equal(out[k], w[k])


def test_space_roundtrip_keeps_sign_groups():
    _, space, _ = _tanh_mlp()
    assert sign_groups(WeightSpace.from_json(space.to_json())) == sign_groups(space)


def _signs_by_definition(weights, space, signs):
    """``apply_signs`` from its definition, with the uncached coordinates."""
    out = {}
    for name, t in space.tensors.items():
        w = weights[name]
        for i, axis in enumerate(t.axes):
            for g in axis.groups:
                c = _coords(axis, g)
                factor = torch.where(c >= 0, signs[g][c.clamp(min=0)], 1.0)
                shape = [1] * w.dim()
                shape[i] = -1
                w = w * factor.reshape(shape)
        out[name] = w
    return out


def test_apply_signs_caches_per_axis_structure():
    """The index tensors ``apply_signs`` caches belong to an axis's whole structure:
    spaces with the same tensor names, shapes and group name but other axes (one group
    size shared too) never reuse each other's, whatever the order of the calls."""

    def space(w_axis, b_axis, size):
        return WeightSpace.build(
            [Group("h", size, action="sign")],
            [
                TensorSpec("w", (4, 3), (w_axis, Axis.fixed(3))),
                TensorSpec("b", (4,), (b_axis,), role="bias"),
            ],
        )

    spaces = [
        space(Axis.of("h", 4), Axis.of("h", 4), 4),
        space(Axis.product((None, 2), ("h", 2)), Axis.concat(Axis.of("h", 2), Axis.fixed(2)), 2),
        space(Axis.product(("h", 2), (None, 2)), Axis.concat(Axis.fixed(2), Axis.of("h", 2)), 2),
    ]
    gen = torch.Generator().manual_seed(5)
    w = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    seen = []
    for sp in spaces + spaces[::-1]:  # each space before and after the others
        signs = {"h": -torch.ones(sp.groups["h"].size)}
        signs["h"][0] = 1.0
        out = apply_signs(w, sp, signs)
        ref = _signs_by_definition(w, sp, signs)
        for k in w:
            torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
        seen.append(out["w"])
    # the three spaces flip different entries of the same weights
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    with pytest.raises(ValueError, match="signs"):
        apply_signs(w, spaces[1], {"h": torch.ones(4)})
