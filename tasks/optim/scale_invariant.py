"""Optimizer steps without a radial part on norm-scale-invariant weights (AdamP/SGDP).

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights" (ICLR 2021): a weight ``w`` followed by a normalization computes the same
function as ``s w``, so its gradient is orthogonal to ``w``; momentum still pushes along
``w`` and the norm ``|w|`` grows, which shrinks the effective step ``lr / |w|²``. AdamP
and SGDP remove the radial component of each update,

.. math::
    \\Delta \\leftarrow \\Delta - \\frac{\\langle \\Delta, w \\rangle}{|w|^2} \\, w,

on the weights they *guess* are scale-invariant: those whose gradient has a cosine
similarity below ``delta / sqrt(dim)`` with the weight, per channel or per layer.

:class:`NormProjected` needs no guess: the :class:`~metanet.WeightSpace` lists the
invariances (:attr:`~metanet.WeightSpace.norm_scales`). For a per-channel one (a conv
before BatchNorm) ``w`` is one channel's rows of every member (kernel and bias together);
for a whole-region one (a residual stream read only by LayerNorms) it is every member
parameter at once. It wraps any ``torch.optim`` optimizer: the inner step runs, and its
update is projected on those tensors. Buffers that scale along (running statistics) are
not optimized and are left alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metanet.space import NormScale, WeightSpace

__all__ = ["NormProjected"]


class NormProjected:
    """Wrap ``optimizer``: after each step, remove the radial part of the update on every
    norm-scale-invariant unit of ``space`` (see the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        model: the network whose parameters are named as in ``space``.
        space: its WeightSpace, with ``norm_scales`` (from :func:`converters.from_module`).

    Attributes:
        units: per norm scale, the member parameters ``(name, axis or None)`` projected.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, space: WeightSpace):
        self.optimizer = optimizer
        params = dict(model.named_parameters())
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._params = params
        self.units: list[tuple[NormScale, list[tuple[str, int | None]]]] = []
        for ns in space.norm_scales:
            members = [
                (name, axis)
                for name, axis, power in ns.members
                if power == 1 and name in params and id(params[name]) in optimized
            ]
            if members:
                self.units.append((ns, members))
        if not self.units:
            raise ValueError(
                "NormProjected: the space has no norm scale invariance on the optimizer's "
                "parameters (space.norm_scales is empty); use the optimizer itself"
            )

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def _rows(self, tensors: list[Tensor], axes: list[int | None], size: int) -> Tensor:
        """Members as one ``(size, -1)`` matrix: row ``c`` holds channel ``c`` of each."""
        parts = [
            t.reshape(1, -1) if a is None else t.movedim(a, 0).reshape(size, -1)
            for t, a in zip(tensors, axes)
        ]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def step(self, closure=None):
        old = {
            name: self._params[name].detach().clone()
            for _, members in self.units
            for name, _ in members
        }
        loss = self.optimizer.step(closure)
        for ns, members in self.units:
            names = [n for n, _ in members]
            axes = [a for _, a in members]
            w = self._rows([old[n] for n in names], axes, ns.size)
            d = self._rows([self._params[n] - old[n] for n in names], axes, ns.size)
            radial = (d * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-30)
            d = d - radial * w
            offset = 0
            for name, axis in members:
                p = self._params[name]
                if axis is None:
                    n = p.numel()
                    piece = d[0, offset : offset + n].reshape(p.shape)
                else:
                    moved = p.movedim(axis, 0)
                    n = moved[0].numel()
                    piece = d[:, offset : offset + n].reshape(moved.shape).movedim(0, axis)
                p.copy_(old[name] + piece)
                offset += n
        return loss
