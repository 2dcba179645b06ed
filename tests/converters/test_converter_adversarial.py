"""Patterns that once fooled the converter: each must stay sound (function preserved).

Found by an adversarial review; every model here claimed a symmetry it lacked before the
fix named in its docstring.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from converters import from_module
from metanet import to_graph, to_weights
from metanet.testing import assert_function_preserved


class Shift(nn.Module):
    """In-place write through a view into a zeros buffer (export is functionalized)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        z = x.new_zeros(x.shape[0], 6)
        z[:, 1:] = h[:, :-1]
        return self.l2(z)


class StaleScale(nn.Module):
    """A factor tied to a parameter before a fused axis is split by selection."""

    def __init__(self):
        super().__init__()
        self.q, self.s, self.l3 = nn.Linear(3, 8), nn.Parameter(torch.randn(4)), nn.Linear(4, 2)

    def forward(self, x):
        h = self.q(x).view(x.shape[0], 2, 4) * self.s
        return self.l3(h[:, 0] + h[:, 1])


class RNNStateFeatures(nn.Module):
    """h_n of a 2-layer bidirectional LSTM flattened into features (layer axis = positions)."""

    def __init__(self, learned_h0: bool = False):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(4, 1, 4)) if learned_h0 else None
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        if self.h0 is not None:
            h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
            _, (h, _) = self.rnn(x, (h0, torch.zeros_like(h0)))
        else:
            _, (h, _) = self.rnn(x)
        return self.head(h.permute(1, 0, 2).reshape(x.shape[0], -1))


class CumsumWeights(nn.Module):
    """A positional op (cumsum) of a constant tensor varies along its axis."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)) * torch.ones(5).cumsum(0))


class PReLUConv(nn.Sequential):
    """PReLU's weight lies along the channel axis (1), not the last one."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 1), nn.PReLU(4), nn.Conv2d(4, 2, 1))


class GLU(nn.Module):
    """GLU halves an axis: not an elementwise op."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.l2(F.glu(self.l1(x)))


class KthValue(nn.Module):
    """kthvalue's dim is its third argument."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 1)

    def forward(self, x):
        return torch.kthvalue(self.c1(x), 2, dim=1).indices.to(x.dtype).sum(1)


CASES = [
    ("shift", Shift, (torch.randn(4, 3),)),
    ("stale_scale", StaleScale, (torch.randn(4, 3),)),
    ("rnn_state", RNNStateFeatures, (torch.randn(2, 5, 3),)),
    ("rnn_learned_h0", lambda: RNNStateFeatures(True), (torch.randn(2, 5, 3),)),
    ("cumsum", CumsumWeights, (torch.randn(4, 3),)),
    ("prelu", PReLUConv, (torch.randn(2, 3, 5, 5),)),
    ("glu", GLU, (torch.randn(4, 3),)),
    ("kthvalue", KthValue, (torch.randn(2, 3, 7),)),
]


@pytest.mark.parametrize("name,make,inputs", CASES, ids=[c[0] for c in CASES])
def test_sound(name, make, inputs):
    torch.manual_seed(0)
    model = make().double().eval()
    inputs = tuple(x.double() for x in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = from_module(model, inputs)
    assert_function_preserved(model, space, inputs, n=10, rtol=1e-9)
    sd = model.state_dict()
    back = to_weights(space, to_graph(space, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_glu_and_prelu_keep_their_real_symmetry():
    torch.manual_seed(0)
    glu = from_module(GLU().double(), torch.randn(4, 3, dtype=torch.float64))
    assert glu.free_dims() == 4  # the two halves are tied, 4 units free
    prelu = from_module(PReLUConv().double(), torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert prelu.free_dims() == 4
