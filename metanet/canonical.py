"""Sign canonicalization: remove the sign symmetry of odd activations from weights.

A hidden neuron followed by an odd activation (``tanh``, ``sin``, ...) can be negated
without changing the network's function: negate its incoming row and bias (so its
pre-activation, hence its activation, changes sign) and its outgoing column (so the next
layer reads the same value). The :class:`~metanet.WeightSpace` marks such groups with
``action="sign"``. Permutation-equivariant metanetworks (UNF, NFN, GMN) see the ``2^n``
sign patterns of one network as different inputs; :func:`canonicalize_sign` maps all of
them to one representative, so a metanetwork only has to deal with permutations.

For every neuron ``i`` of a sign group the statistic ``t_i`` is the entry of largest
magnitude among the values that *only neuron i's* flip changes: its bias, its rows in the
tensors that write it and its columns in the tensors that read it, where the tensor's
other axes carry no sign group that is still unresolved (input pixels, logits, kernel
taps, plain permutation groups, or a sign group canonicalized before). Neuron ``i`` is
negated when ``t_i < 0``. Groups are resolved in the space's order, repeatedly, so a
hidden layer between two sign layers uses the weights of the canonicalized one. The
result is exactly invariant under sign flips and equivariant under permutations (up to
exact ties in magnitude, a measure-zero event for real weights); the function is kept.

Groups indexed by another group (wreath products) and groups on tensors other than
weights and biases (normalization layers) are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import torch
from torch import Tensor

from metanet.space import Axis, Factor, WeightSpace

__all__ = ["sign_groups", "random_signs", "apply_signs", "canonicalize_sign"]

_SIGN_ROLES = ("weight", "bias")


def sign_groups(space: WeightSpace) -> list[str]:
    """The groups :func:`canonicalize_sign` resolves: ``action="sign"``, not indexed by
    another group, touching only weights and biases."""
    other = {h for t in space.tensors.values() if t.role not in _SIGN_ROLES for h in t.groups}
    return [
        name
        for name, g in space.groups.items()
        if g.action == "sign" and g.within is None and name not in other
    ]


def _coords(axis: Axis, group: str) -> Tensor:
    """For each index of ``axis``: its coordinate in ``group``'s factor, -1 if none."""
    parts = []
    for seg in axis.segments:
        sizes = [f.size for f in seg]
        n = math.prod(sizes)
        k = next((j for j, f in enumerate(seg) if f.group == group), None)
        if k is None:
            parts.append(torch.full((n,), -1, dtype=torch.long))
        else:
            parts.append(torch.unravel_index(torch.arange(n), tuple(sizes))[k])
    return torch.cat(parts)


# Axis is a frozen dataclass of tuples: hashable and compared by value, so these caches
# are keyed on the axis's whole structure, not on the object; two spaces (or tensors)
# share an entry only when the axis is the same. The tensors returned are shared: read
# them, never write into them.
@lru_cache(maxsize=4096)
def _cached_coords(axis: Axis, group: str) -> Tensor:
    """:func:`_coords`, computed once per ``(axis, group)``."""
    return _coords(axis, group)


@lru_cache(maxsize=4096)
def _sign_plan(axis: Axis) -> tuple[tuple[str, int, Tensor | None], ...]:
    """For each group on ``axis``: ``(group, size, index)``, ``index`` picking every
    axis position's sign from the group's signs extended by a trailing ``+1`` (for the
    positions outside the group), or None where the axis is the group's factor alone
    (the signs themselves)."""
    plan = []
    for g in axis.groups:
        n = next(f.size for seg in axis.segments for f in seg if f.group == g)
        if axis.segments == ((Factor(g, n),),):
            plan.append((g, n, None))
        else:
            c = _coords(axis, g)
            plan.append((g, n, torch.where(c < 0, n, c)))
    return tuple(plan)


def random_signs(
    space: WeightSpace, generator: torch.Generator | None = None, batch: tuple[int, ...] = ()
) -> dict[str, Tensor]:
    """Uniformly random ``±1`` per neuron of every :func:`sign_groups` group:
    ``{group: (*batch, size)}``."""
    return {
        g: torch.randint(0, 2, (*batch, space.groups[g].size), generator=generator) * 2.0 - 1.0
        for g in sign_groups(space)
    }


def apply_signs(
    weights: Mapping[str, Tensor], space: WeightSpace, signs: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Negate neurons: ``signs[group]`` is ``(*lead, size)`` of ``±1``; every tensor
    index whose coordinate in ``group`` is ``i`` is multiplied by ``signs[group][..., i]``
    (on every axis the group touches). ``weights`` may carry the leading axes ``lead``
    (a batch), matched to the trailing dimensions of each tensor as in
    :meth:`WeightSpace.apply`. Tensors not in the space are returned unchanged."""
    out = dict(weights)
    for name, t in space.tensors.items():
        w = out[name]
        lead = w.dim() - len(t.shape)
        for i, axis in enumerate(t.axes):
            for g, n, index in _sign_plan(axis):
                if g not in signs:
                    continue
                s = signs[g]
                if s.shape[-1] != n:
                    raise ValueError(f"signs[{g!r}] has {s.shape[-1]} signs, group has {n}")
                factor = s.to(device=w.device, dtype=w.dtype)
                if index is not None:
                    ext = torch.cat([factor, torch.ones_like(factor[..., :1])], -1)
                    factor = ext[..., index.to(w.device)]
                sl = factor.dim() - 1  # the signs' leading axes: the last of the weights'
                if sl > lead:
                    raise ValueError(
                        f"signs[{g!r}] has {sl} leading axes, tensor {name!r} only {lead}"
                    )
                shape = [1] * (lead - sl) + list(factor.shape[:-1]) + [1] * len(t.shape)
                shape[lead + i] = axis.size
                w = w * factor.reshape(shape)
        out[name] = w
    return out


def _statistic(
    weights: Mapping[str, Tensor], space: WeightSpace, group: str, unresolved: set[str]
) -> Tensor | None:
    """``t_i`` per neuron of ``group`` (``(*lead, size)``), or None if no value qualifies."""
    n = space.groups[group].size
    cands = []
    for name in space.tensors_of(group):
        t = space.tensors[name]
        axes = [i for i, a in enumerate(t.axes) if group in a.groups]
        if len(axes) != 1:
            continue  # the group on two axes: some values are flipped twice
        i = axes[0]
        if any(h in unresolved for h in t.groups if h != group):
            continue  # another unresolved sign group flips these values too
        w = weights[name]
        lead = w.dim() - len(t.shape)
        rows = w.movedim(lead + i, -1)
        rows = rows.reshape(*w.shape[:lead], -1, t.shape[i]).transpose(-1, -2)
        best = rows.gather(-1, rows.abs().argmax(-1, keepdim=True)).squeeze(-1)
        c = _cached_coords(t.axes[i], group).to(w.device)
        kept = torch.nonzero(c >= 0).squeeze(1)
        order = kept[torch.sort(c[kept], stable=True).indices].reshape(n, -1)
        cands.append(best[..., order])  # (*lead, n, rows per neuron)
    if not cands:
        return None
    allc = torch.cat(cands, -1)
    return allc.gather(-1, allc.abs().argmax(-1, keepdim=True)).squeeze(-1)


def canonicalize_sign(
    weights: Mapping[str, Tensor], space: WeightSpace, return_signs: bool = False
):
    """Weights with every neuron of every sign group flipped to its canonical sign.

    ``weights`` is a state dict, or a batch of them (leading axes on every tensor, as in
    :meth:`WeightSpace.apply`). Returns the canonical weights, and with ``return_signs``
    also the signs applied (``{group: (*lead, size)}``; ``apply_signs`` with them maps
    the input to the output, and they are their own inverse). Two networks that differ
    by sign flips map to the same weights; permuting the input permutes the output.
    """
    w = dict(weights)
    every = {g for g, spec in space.groups.items() if spec.action == "sign"}
    pending = sign_groups(space)
    unresolved = set(every)
    signs: dict[str, Tensor] = {}
    progress = True
    while pending and progress:
        progress = False
        for g in list(pending):
            stat = _statistic(w, space, g, unresolved)
            if stat is None:
                continue
            s = torch.where(stat < 0, -1.0, 1.0).to(stat.dtype)
            w = apply_signs(w, space, {g: s})
            signs[g] = s
            pending.remove(g)
            unresolved.discard(g)
            progress = True
    return (w, signs) if return_signs else w
