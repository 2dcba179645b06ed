"""ShuffleNetV2: ``chunk`` of a channel-shuffled axis keeps the symmetry (float64).

A stride-1 unit computes ``cat((x1, branch2(x2)))`` with ``x1, x2 = x.chunk(2, 1)``, and the
shuffle views that concat as ``(2, c/2)`` and transposes it. The converter reads
``cat(A, B)`` of two equal segments as ``fixed(2) × X`` with ``A ≡ B ≡ X`` (one permutation
for both halves: a subgroup, sound), and the next unit's chunk of the shuffled
``X × fixed(2)`` in whole 2-blocks refines ``X`` into ``X_0 ⊕ X_1`` (each permuted within
itself, the trailing factor shared). Before, each shuffle fixed its axes with a note.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from converters import ConverterWarning, from_module
from metanet.testing import assert_function_preserved
from tests.fixtures.large import ShuffleNetV2, _randomize


def _convert(model, inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        space = from_module(model, inputs)
    return space, [w for w in caught if issubclass(w.category, ConverterWarning)]


def _free(space) -> int:
    return sum(
        g.size * (space.groups[g.within].size if g.within else 1) for g in space.groups.values()
    )


@pytest.mark.parametrize(
    "repeats, hand",
    [
        # stem 8, final conv 32, each unit's branch2 hidden 8 (3 units); the stage stream
        # X (8: branch1 ≡ branch2 of the stride-2 unit) is split by unit 1 into X1 (4) ⊕
        # X2 (4), and X1 by unit 2 into 2 ⊕ 2: 8 + 32 + 3·8 + (2 + 2 + 4)
        ((3,), 8 + 32 + 3 * 8 + (2 + 2 + 4)),
        # a fourth unit splits X1a (2) into 1 ⊕ 1 (no group left) and adds its hidden 8
        ((4,), 8 + 32 + 4 * 8 + (2 + 4)),
    ],
)
def test_chunk_of_a_shuffled_axis_keeps_the_symmetry(repeats, hand):
    torch.manual_seed(0)
    model = _randomize(ShuffleNetV2(repeats=repeats, widths=(8, 16, 32), num_classes=5), 0)
    model = model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    space, caught = _convert(model, (x,))
    assert not caught, [str(w.message) for w in caught]
    assert not space.notes
    assert _free(space) == hand
    assert assert_function_preserved(model, space, (x,), n=10, atol=1e-9) < 1e-9


def test_two_stages_keep_the_symmetry():
    torch.manual_seed(0)
    model = _randomize(ShuffleNetV2(repeats=(2, 2), widths=(8, 48, 96, 32), num_classes=5), 0)
    model = model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    space, caught = _convert(model, (x,))
    assert not caught and not space.notes
    assert assert_function_preserved(model, space, (x,), n=10, atol=1e-9) < 1e-9


class _CatThenShuffle(torch.nn.Module):
    """Two branches of different structure (a plain conv; a conv whose output is a
    ``2 × 4`` product read by a grouped conv) concatenated and channel-shuffled."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(3, 8, 1)
        self.g = torch.nn.Conv2d(8, 8, 1, groups=2)
        self.out = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.relu(self.g(torch.relu(self.b(x))))
        y = torch.cat((a, b), 1)
        b_, c, h, w = y.shape
        y = y.reshape(b_, 2, c // 2, h, w).transpose(1, 2).reshape(b_, c, h, w)
        return self.out(torch.relu(y))


def test_cat_of_differently_structured_segments_stays_sound():
    torch.manual_seed(0)
    model = _CatThenShuffle().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    space, _ = _convert(model, (x,))
    assert assert_function_preserved(model, space, (x,), n=10, atol=1e-9) < 1e-9
