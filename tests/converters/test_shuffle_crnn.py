"""Symmetry through a channel shuffle and a pass-through adaptive pool; conflicts warn."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from converters import ConverterWarning, from_module
from metanet.testing import assert_function_preserved
from tests.fixtures.architectures import ShuffleNetTiny, entry, randomize_batchnorm


def _convert(model, inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        space = from_module(model, inputs)
    return space, [w for w in caught if issubclass(w.category, ConverterWarning)]


@pytest.mark.parametrize(
    "name,hand",
    [
        # stream: group factor 2 + within-group 8; per unit the bottleneck's inner factor 2
        ("shufflenet_tiny", 2 + 8 + 2 * 2),
        # conv 8 + conv 16 (through the pool into the LSTM) + LSTM hidden 16
        ("crnn_tiny", 8 + 16 + 16),
    ],
)
def test_full_symmetry_found_and_function_kept(name, hand):
    e = entry(name)
    model, inputs = e.build(torch.float64), e.inputs(torch.float64)
    space, warned = _convert(model, inputs)
    assert not warned, [str(w.message) for w in warned]
    assert space.free_dims() == hand == e.hand_count
    assert assert_function_preserved(model, space, inputs, n=8, rtol=1e-9, dtype=None) < 1e-9


def test_shuffled_bottleneck_is_read_as_the_common_refinement():
    e = entry("shufflenet_tiny")
    space, _ = _convert(e.build(torch.float64), e.inputs(torch.float64))
    # conv1 writes 2 groups x 4; the shuffle reads it as 4 x 2, conv2 as 2 x 4: refined to
    # 2 x 2 x 2 where the outer factor (conv1's groups) and the middle one (conv2's groups)
    # are both the stream's group factor (tied by the residual add)
    rows = space["units.0.conv1.weight"].axes[0].segments[0]
    stream = space["stem.0.weight"].axes[0].segments[0]
    assert [f.size for f in rows] == [2, 2, 2]
    assert rows[0].group == rows[1].group == stream[0].group
    assert rows[2].group is not None and rows[2].group != rows[0].group
    # the depthwise conv in between sees the shuffled order: 2 x 2 x 2 permuted
    dw = space["units.0.dwconv.weight"].axes[0].segments[0]
    assert [f.group for f in dw] == [rows[1].group, rows[2].group, rows[0].group]


def test_channels_pass_through_the_adaptive_pool_into_the_lstm():
    e = entry("crnn_tiny")
    space, _ = _convert(e.build(torch.float64), e.inputs(torch.float64))
    conv = space["features.4.weight"].axes[0].groups
    assert len(conv) == 1
    assert space["rnn.weight_ih_l0"].axes[1].groups == conv


def test_pool_that_really_pools_an_axis_still_fixes_it():
    """AdaptiveAvgPool2d((2, 1)) on (b, width, channels, height) averages channel pairs:
    the channels are mixed, so the conv's group must not survive into the LSTM."""
    e = entry("crnn_tiny")
    model = e.build(torch.float64)
    model.pool = torch.nn.AdaptiveAvgPool2d((8, 1))
    model.rnn = torch.nn.LSTM(8, 16, batch_first=True).double()
    inputs = e.inputs(torch.float64)
    space, _ = _convert(model, inputs)
    assert space["features.4.weight"].axes[0].is_fixed
    assert space["rnn.weight_ih_l0"].axes[1].is_fixed
    assert assert_function_preserved(model, space, inputs, rtol=1e-9, dtype=None) < 1e-9


def test_conflicting_shuffle_warns_with_op_module_and_lost_dims():
    """12 bottleneck channels in 3 groups: the shuffle gives (4, 3), the second grouped conv
    reads blocks of 4, which cut the rows of 3. Its input (4 + 3 free points) and its group
    order (3) are fixed: 10 free dims lost at units.0.conv2, warned, listed in the summary,
    while the within-group stream channels (12 / 3 = 4) keep their symmetry."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ShuffleNetTiny(channels=12, mid=12, groups=3)).double().eval()
    inputs = (torch.randn(2, 3, 6, 6, dtype=torch.float64),)
    space, warned = _convert(model, inputs)
    messages = [str(w.message) for w in warned]
    first = next(m for m in messages if "units.0.conv2" in m)
    assert "aten.conv2d" in first and "(Conv2d)" in first
    assert re.search(r"do not split into the 3 groups", first)
    assert re.search(r"\b10 free permutation dims lost", first)
    assert any("units.1.conv2" in m for m in messages)
    assert "units.0.conv2" in space.summary()
    assert space.free_dims() == 4
    assert assert_function_preserved(model, space, inputs, n=8, rtol=1e-9, dtype=None) < 1e-9
