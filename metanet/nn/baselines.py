"""Baselines a metanetwork paper compares against: a flat MLP and StatNN.

* :class:`FlatMLP` reads every weight as one long vector: no symmetry at all.
* :class:`StatNN` (Unterthiner et al., "Predicting Neural Network Accuracy from Weights",
  2020) reads per-tensor statistics (mean, variance and quantiles): invariant to every
  permutation, and blind to how weights connect.

Both read weight features only: integer and bool buffers (``num_batches_tracked``) are
not inputs (:func:`metanet.graph.feature_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from metanet.graph import feature_tensors
from metanet.space import WeightSpace

__all__ = ["FlatMLP", "StatNN"]


def _head(i: int, hidden: int, o: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(i, hidden), nn.ReLU()]
        i = hidden
    return nn.Sequential(*mods, nn.Linear(i, o))


class FlatMLP(nn.Module):
    """MLP on the concatenation of all flattened weight-feature tensors (``{name: (B, *shape)}`` or
    ``(B, 1, *shape)``) -> ``(B, out_features)``."""

    def __init__(
        self, space: WeightSpace, out_features: int = 1, hidden: int = 256, layers: int = 2
    ):
        super().__init__()
        self.names = feature_tensors(space)
        width = sum(math.prod(space.tensors[n].shape) for n in self.names)
        self.net = _head(width, hidden, out_features, layers)

    def forward(self, weights: Mapping[str, Tensor]) -> Tensor:
        b = next(iter(weights.values())).shape[0]
        return self.net(torch.cat([weights[n].reshape(b, -1) for n in self.names], dim=1))


class StatNN(nn.Module):
    """MLP on per-tensor statistics: mean, variance, and the 0/25/50/75/100% quantiles."""

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(
        self, space: WeightSpace, out_features: int = 1, hidden: int = 256, layers: int = 2
    ):
        super().__init__()
        self.names = feature_tensors(space)
        self.net = _head(len(self.names) * (2 + len(self.QUANTILES)), hidden, out_features, layers)

    def forward(self, weights: Mapping[str, Tensor]) -> Tensor:
        b = next(iter(weights.values())).shape[0]
        stats = []
        for n in self.names:
            w = weights[n].reshape(b, -1).float()
            qs = torch.tensor(self.QUANTILES, dtype=w.dtype, device=w.device)
            q = torch.quantile(w, qs, dim=1).T
            stats += [w.mean(1, keepdim=True), w.var(1, keepdim=True, unbiased=False), q]
        return self.net(torch.cat(stats, dim=1).to(next(self.parameters()).dtype))
