"""symmetry_certificate: the continuous symmetry claimed vs the Jacobian's rank (float64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from converters import from_module
from metanet import WeightSpace
from metanet.space import NormScale
from metanet.testing import claimed_continuous_dims, symmetry_certificate


def _inputs(shape: tuple[int, ...]):
    """Gaussian inputs at several scales, so that every ReLU region is visited."""

    def make(n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, *shape, dtype=torch.float64, generator=g)
        scale = torch.exp(
            torch.rand(n, *[1] * len(shape), dtype=torch.float64, generator=g) * 3 - 1
        )
        return x * scale

    return make


def _with_actions(space: WeightSpace, actions: dict[str | None, str | None]) -> WeightSpace:
    """The same space with group actions replaced (``old action -> new``)."""
    groups = {
        n: dataclasses.replace(g, action=actions.get(g.action, g.action))
        for n, g in space.groups.items()
    }
    return WeightSpace(
        groups, space.tensors, space.neuron_sets, space.identities, space.notes, space.norm_scales
    )


def _linear_pair() -> tuple[nn.Module, WeightSpace]:
    """x -> W1 x -> W2 (.) + b: no activation between, so any invertible M acts as
    W1 -> M W1, W2 -> W2 M^-1: GL(3), 9 directions, and nothing else (the middle layer has
    no bias to translate; 3 <= min(4, 5) so the product keeps rank 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 5)).double()
    return model, from_module(model, (torch.randn(2, 4, dtype=torch.float64),))


def test_gl_pair_is_complete():
    model, space = _linear_pair()
    (group,) = space.groups.values()
    assert group.action == "gl" and group.size == 3
    cert = symmetry_certificate(model, space, _inputs((4,)))
    # P = 12 + 15 + 5 = 32; rank-3 5x4 maps (3 (5 + 4 - 3) = 18) plus the bias (5) = 23
    assert (cert.params, cert.rank, cert.deficiency) == (32, 23, 9)
    assert cert.claimed == 9 and cert.verdict == "complete"
    assert cert.largest_dropped < 1e-12 < 1e-6 < cert.smallest_kept


def test_gl_stripped_from_the_space_is_reported_hidden():
    model, space = _linear_pair()
    stripped = _with_actions(space, {"gl": None})
    cert = symmetry_certificate(model, stripped, _inputs((4,)))
    assert cert.claimed == 0 and cert.deficiency == 9
    assert cert.verdict == "9 hidden directions"


def _relu_net() -> tuple[nn.Module, WeightSpace]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    return model, from_module(model, (torch.randn(2, 3, dtype=torch.float64),))


def test_relu_scaling_is_complete_and_overclaiming_is_caught():
    model, space = _relu_net()
    cert = symmetry_certificate(model, space, _inputs((3,)))
    # 6 hidden ReLU units: one positive scale each, nothing hidden
    assert claimed_continuous_dims(space) == {"positive_scale": 6, "gl": 0, "norm_scale": 0}
    assert (cert.params, cert.deficiency, cert.verdict) == (38, 6, "complete")
    # a space claiming GL(6) across a ReLU claims 36 > 6 directions
    wrong = _with_actions(space, {"positive_scale": "gl"})
    assert symmetry_certificate(model, wrong, _inputs((3,))).verdict == "claims too much"


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_norm_scale_is_certified_and_a_false_member_is_named():
    torch.manual_seed(0)
    model = _ConvBN().double()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
    space = from_module(model, (torch.randn(2, 1, 5, 5, dtype=torch.float64),))
    (ns,) = space.norm_scales
    cert = symmetry_certificate(model, space, _inputs((1, 5, 5)))
    # per channel: the conv's row scales alone (BN), and BN's (γ, β) against the head's
    # column (ReLU): 3 + 3 = 6
    assert cert.claimed_by_kind == {"positive_scale": 3, "gl": 0, "norm_scale": 3}
    assert cert.verdict == "complete" and cert.deficiency == 6 and not cert.off_kernel
    head = NormScale("head", 1, (("head.weight", None, 1),))
    bad = WeightSpace(space.groups, space.tensors, space.neuron_sets, norm_scales=(ns, head))
    cert = symmetry_certificate(model, bad, _inputs((1, 5, 5)))
    assert cert.verdict == "claims too much" and cert.off_kernel == ["head"]


def test_size_limit_is_stated():
    model, space = _relu_net()
    with pytest.raises(ValueError, match="38 parameters, above max_params=10"):
        symmetry_certificate(model, space, _inputs((3,)), max_params=10)
    with pytest.raises(ValueError, match="pass >= "):
        symmetry_certificate(model, space, torch.randn(4, 3, dtype=torch.float64))


def test_attention_heads_claim_no_continuous_symmetry():
    """Heads permute as blocks; a GL across heads would mix their softmaxes. The GL that
    acts is inside each head: 4 heads x (8² for q/k + 8² for v) per layer."""
    from tests.fixtures.architectures import entry
    from tests.helpers import converted

    _, _, space = converted(entry("vit_tiny"))
    outer = {g.within for g in space.groups.values() if g.within}
    assert outer and all(space.groups[o].action is None for o in outer)
    assert claimed_continuous_dims(space)["gl"] == 2 * 4 * (64 + 64)


def _product_hidden(space: WeightSpace, within: bool) -> WeightSpace:
    """The ReLU net's 6 hidden units as a product axis ``a:2 × b:3`` (both positive scale;
    with ``within``, ``b`` indexed by ``a`` and ``a`` carrying no action, as heads do)."""
    from metanet.space import Axis, Group

    axis = Axis.product(("a", 2), ("b", 3))
    old = Axis.of("0:0", 6)

    def swap(ax: Axis) -> Axis:
        return axis if ax == old else ax

    groups = {
        "a": Group("a", 2, action=None if within else "positive_scale"),
        "b": Group("b", 3, within="a" if within else None, action="positive_scale"),
    }
    tensors = {
        n: dataclasses.replace(t, axes=tuple(swap(a) for a in t.axes))
        for n, t in space.tensors.items()
    }
    sets = {n: dataclasses.replace(s, axis=swap(s.axis)) for n, s in space.neuron_sets.items()}
    return WeightSpace(groups, tensors, sets, space.identities, space.notes, space.norm_scales)


@pytest.mark.parametrize("within", [False, True])
def test_positive_scale_on_a_product_axis_counts_neurons(within):
    """One positive scale per hidden unit (6), not per permuted point (2 + 3 = 5, or
    2 · 3 = 6 only by luck of the indexed count): the certificate stays complete."""
    model, space = _relu_net()
    product = _product_hidden(space, within)
    assert claimed_continuous_dims(product)["positive_scale"] == 6
    cert = symmetry_certificate(model, product, _inputs((3,)))
    assert (cert.deficiency, cert.claimed, cert.verdict) == (6, 6, "complete")


def test_shufflenet_positive_scales_are_per_channel():
    """shufflenet_tiny: the residual stream (2 × 8 = 16 channels, one set per add: the same
    neurons, counted once) and each unit's ReLU after bn1 (8 channels, 2 × 2 × 2, seen
    again shuffled at the depthwise conv: counted once): 16 + 8 + 8 = 32, not the 14
    permuted points (2 + 8 + 2 + 2)."""
    from tests.fixtures.architectures import entry
    from tests.helpers import converted

    _, _, space = converted(entry("shufflenet_tiny"))
    assert claimed_continuous_dims(space)["positive_scale"] == 16 + 8 + 8
