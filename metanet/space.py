"""The structure of a network's parameters: tensors, axes, symmetry groups, neuron sets.

A :class:`WeightSpace` holds no values. It says, for every tensor that moves with the
weights, which permutation group acts on each of its axes, and how tensors connect the
network's neuron sets (the activation points). Everything downstream (graphs,
equivariant layers, alignment, teleportation) reads this one object.

Axes are described as *segments of factors*. An axis of size ``sum_s prod_f size(f)`` is
the concatenation of segments; inside a segment the index is the row-major product of
its factors. Each factor is ``(group or None, size)``; ``None`` means fixed (no symmetry).

=====================================  ==========================================
axis                                    description
=====================================  ==========================================
hidden units of a Linear                ``[[("h1", 64)]]``
``heads * head_dim``                    ``[[("heads", 4), ("head_dim", 16)]]``
flattened ``channels * (h*w)``          ``[[("c3", 32), (None, 49)]]``
fused ``qkv``                           ``[[("hq",..),("dq",..)], [("hq",..),("dk",..)], ...]``
input pixels / logits / kernel taps     ``[[(None, n)]]``
=====================================  ==========================================

A group may be *indexed* by another group (``Group(within="heads")``): its element is one
permutation per member of the outer group, as in the wreath product of attention layers
where every head permutes its own ``head_dim``.

Convention: an element ``g`` maps group names to index tensors and acts by gathering,
``apply(w, g)[..., i, ...] = w[..., g[group][i], ...]`` on every axis the group touches.
For an indexed group ``g[inner]`` has shape ``(outer_size, size)`` and the row used is the
one of the *new* position of the outer factor. ``compose(g, h)`` is "first g, then h".
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Factor",
    "Axis",
    "Group",
    "NeuronSet",
    "TensorSpec",
    "NormScale",
    "WeightSpace",
    "WeightSpaceError",
    "Element",
    "GROUP_ACTIONS",
]

Element = dict[str, Tensor]
"""A group element: group name -> permutation index tensor (``(size,)``, or
``(outer_size, size)`` for an indexed group)."""

GROUP_ACTIONS = ("positive_scale", "sign", "gl")
"""Continuous symmetries a group may carry besides permutation: ``positive_scale`` (ReLU-
like activations), ``sign`` (odd activations: tanh, sin), ``gl`` (no nonlinearity)."""

NODE_ROLES = ("bias", "norm_weight", "norm_bias", "running_mean", "running_var")
"""Roles of tensors that sit on a neuron set and get a fixed node-feature column."""


class WeightSpaceError(ValueError):
    """A weight space, or weights checked against one, is inconsistent."""


@dataclass(frozen=True)
class Factor:
    """One factor of an axis segment: ``size`` indices acted on by ``group`` (None: fixed)."""

    group: str | None
    size: int

    def __post_init__(self) -> None:
        if int(self.size) < 0:
            raise WeightSpaceError(f"factor size must be >= 0, got {self.size}")


@dataclass(frozen=True)
class Axis:
    """One axis of a tensor (or a neuron set): a concatenation of segments of factors."""

    segments: tuple[tuple[Factor, ...], ...]

    @classmethod
    def fixed(cls, size: int) -> Axis:
        return cls(((Factor(None, int(size)),),))

    @classmethod
    def of(cls, group: str | None, size: int) -> Axis:
        return cls(((Factor(group, int(size)),),))

    @classmethod
    def product(cls, *factors: tuple[str | None, int]) -> Axis:
        """One segment, the row-major product of ``(group, size)`` factors."""
        return cls((tuple(Factor(g, int(n)) for g, n in factors),))

    @classmethod
    def concat(cls, *axes: Axis) -> Axis:
        return cls(tuple(seg for a in axes for seg in a.segments))

    @property
    def size(self) -> int:
        return sum(math.prod(f.size for f in seg) for seg in self.segments)

    @property
    def groups(self) -> tuple[str, ...]:
        """Groups acting on this axis, in order of first appearance."""
        out: list[str] = []
        for seg in self.segments:
            for f in seg:
                if f.group is not None and f.group not in out:
                    out.append(f.group)
        return tuple(out)

    @property
    def is_fixed(self) -> bool:
        return not self.groups

    def to_json(self) -> list:
        return [[[f.group, f.size] for f in seg] for seg in self.segments]

    @classmethod
    def from_json(cls, data: list) -> Axis:
        return cls(tuple(tuple(Factor(g, int(n)) for g, n in seg) for seg in data))

    def __str__(self) -> str:
        def fac(f: Factor) -> str:
            return f"{f.group}:{f.size}" if f.group else str(f.size)

        segs = ["×".join(fac(f) for f in seg) for seg in self.segments]
        return " ⊕ ".join(segs) if len(segs) > 1 else segs[0]


@dataclass(frozen=True)
class Group:
    """A permutation group ``S_size`` acting on some axes.

    Args:
        name: unique name.
        size: number of points permuted.
        within: name of an outer group; this group is then indexed by it (one
            permutation per member of the outer group, a wreath product).
        action: continuous symmetry the activation that follows allows, one of
            :data:`GROUP_ACTIONS` or None.
    """

    name: str
    size: int
    within: str | None = None
    action: str | None = None

    def __post_init__(self) -> None:
        if self.action is not None and self.action not in GROUP_ACTIONS:
            raise WeightSpaceError(
                f"group {self.name!r}: action must be one of {GROUP_ACTIONS} or None, "
                f"got {self.action!r}"
            )


@dataclass(frozen=True)
class NeuronSet:
    """An activation point of the network: ``axis.size`` neurons.

    ``kind`` is ``input``, ``hidden``, ``output`` or ``residual``; ``layer`` its depth.
    """

    name: str
    axis: Axis
    kind: str = "hidden"
    layer: int = 0


@dataclass(frozen=True)
class TensorSpec:
    """A tensor that moves with the weights.

    Edge tensors (``role="weight"``) connect ``in_set`` (axis ``in_axis``) to ``out_set``
    (axis ``out_axis``); their other axes are kernel taps. Node tensors sit on
    ``out_set`` (axis ``out_axis``): biases, norm scales/shifts, running statistics.
    Tensors on no set (scalars such as ``num_batches_tracked``) have ``out_set=None``.
    """

    name: str
    shape: tuple[int, ...]
    axes: tuple[Axis, ...]
    role: str = "weight"
    kind: str = "parameter"
    dtype: str = "float32"
    out_set: str | None = None
    out_axis: int | None = None
    in_set: str | None = None
    in_axis: int | None = None

    @property
    def is_edge(self) -> bool:
        return self.in_set is not None

    @property
    def is_node(self) -> bool:
        return self.out_set is not None and self.in_set is None

    @property
    def groups(self) -> tuple[str, ...]:
        out: list[str] = []
        for a in self.axes:
            out += [g for g in a.groups if g not in out]
        return tuple(out)

    def blocks(
        self,
    ) -> Iterator[tuple[tuple[tuple[int, int], ...], tuple[tuple[Factor, ...], ...]]]:
        """Every choice of one segment per axis: ``(ranges, segments)``, with per axis the
        ``(start, stop)`` of the segment and its factors, in row-major order of the
        choices. A tensor whose axes are concatenations (``qkv``, a fire module's concat)
        splits into these blocks; alignment's views and UNF's pieces are cut from them."""
        per_axis = []
        for axis in self.axes:
            choices, start = [], 0
            for seg in axis.segments:
                n = math.prod(f.size for f in seg)
                choices.append(((start, start + n), seg))
                start += n
            per_axis.append(choices)
        for combo in itertools.product(*per_axis):
            yield tuple(r for r, _ in combo), tuple(seg for _, seg in combo)

    @property
    def tap_shape(self) -> tuple[int, ...]:
        """Shape of the axes that are neither ``out_axis`` nor ``in_axis``."""
        skip = {self.out_axis, self.in_axis}
        return tuple(n for i, n in enumerate(self.shape) if i not in skip)

    def to_json(self) -> dict:
        d = {
            "shape": list(self.shape),
            "axes": [a.to_json() for a in self.axes],
            "role": self.role,
            "kind": self.kind,
            "dtype": self.dtype,
        }
        for key in ("out_set", "out_axis", "in_set", "in_axis"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_json(cls, name: str, d: Mapping) -> TensorSpec:
        return cls(
            name=name,
            shape=tuple(int(n) for n in d["shape"]),
            axes=tuple(Axis.from_json(a) for a in d["axes"]),
            role=d.get("role", "weight"),
            kind=d.get("kind", "parameter"),
            dtype=d.get("dtype", "float32"),
            out_set=d.get("out_set"),
            out_axis=d.get("out_axis"),
            in_set=d.get("in_set"),
            in_axis=d.get("in_axis"),
        )


@dataclass(frozen=True)
class NormScale:
    """Tensors that a normalization makes scale-invariant together.

    Every path from these tensors meets a normalization (``norms``: BatchNorm, LayerNorm,
    GroupNorm, RMSNorm, ...) before any non-homogeneous op, so multiplying each member
    ``(tensor, axis, power)`` by ``s ** power`` leaves the function unchanged, for any
    ``s > 0``: with ``axis`` an int, ``s`` has shape ``(size,)`` and row ``i`` along that
    axis gets ``s[i] ** power`` (per-channel norms: one scale per channel); with ``axis``
    None the whole tensor gets the one factor ``s[0] ** power`` (``size == 1``). Powers are
    1 for weights, biases and running means, 2 for running variances. Exact when the norms'
    ``eps`` is 0; otherwise the output moves by ``O(eps / var)``.
    """

    name: str
    size: int
    members: tuple[tuple[str, int | None, int], ...]
    norms: tuple[str, ...] = ()

    def apply(self, weights: Mapping[str, Tensor], s: Tensor) -> dict[str, Tensor]:
        """``weights`` with every member scaled; ``s``: ``(size,)`` positive factors
        (differentiable; leading batch axes on the weights are not supported)."""
        if s.shape != (self.size,):
            raise WeightSpaceError(
                f"norm scale {self.name!r}: factors have shape {tuple(s.shape)}, expected "
                f"({self.size},)"
            )
        out = dict(weights)
        for name, axis, power in self.members:
            w = out[name]
            f = s.to(w.dtype) ** power
            if axis is None:
                out[name] = w * f[0]
            else:
                shape = [1] * w.dim()
                shape[axis] = self.size
                out[name] = w * f.reshape(shape)
        return out

    def to_json(self) -> dict:
        return {
            "size": self.size,
            "members": [list(m) for m in self.members],
            "norms": list(self.norms),
        }

    @classmethod
    def from_json(cls, name: str, d: Mapping) -> NormScale:
        try:
            members = tuple(
                (str(t), None if a is None else int(a), int(p)) for t, a, p in d["members"]
            )
            return cls(name, int(d["size"]), members, tuple(str(n) for n in d.get("norms", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightSpaceError(
                f"norm_scales[{name!r}] must be {{'size': int, 'members': [[tensor, axis or "
                f"null, power], ...]}} ({type(e).__name__}: {e})"
            ) from None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise WeightSpaceError(f"unknown dtype {name!r}")
    return dt


@dataclass(frozen=True, eq=True)
class WeightSpace:
    """The structure and symmetry of a network's weights (no values). Immutable: derive a
    changed one with :meth:`replace`.

    Args:
        groups: the permutation groups.
        tensors: every tensor that moves with the weights, in state-dict order.
        neuron_sets: the activation points, in forward order.
        identities: ``(src_set, dst_set)`` pairs joined by an identity map (residual adds).
        notes: free-form remarks (e.g. axes fixed for lack of a rule).
        norm_scales: scale invariances that normalizations create (:class:`NormScale`).
    """

    groups: dict[str, Group]
    tensors: dict[str, TensorSpec]
    neuron_sets: dict[str, NeuronSet] = field(default_factory=dict)
    identities: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    norm_scales: tuple[NormScale, ...] = ()

    __hash__ = None  # its dicts are not hashable; compare with ==

    def __post_init__(self) -> None:
        normal = {
            "groups": dict(self.groups),
            "tensors": dict(self.tensors),
            "neuron_sets": dict(self.neuron_sets),
            "identities": tuple(tuple(p) for p in self.identities),
            "notes": tuple(self.notes),
            "norm_scales": tuple(self.norm_scales),
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)
        self._check()
        self._check_norm_scales()

    def replace(self, **changes) -> WeightSpace:
        """A copy with ``changes`` (any of the fields), checked like any new space;
        everything else, ``norm_scales`` included, carried over."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        groups: Iterable[Group],
        tensors: Iterable[TensorSpec],
        neuron_sets: Iterable[NeuronSet] = (),
        identities: Iterable[tuple[str, str]] = (),
        notes: Iterable[str] = (),
        norm_scales: Iterable[NormScale] = (),
    ) -> WeightSpace:
        """Build from lists (names taken from the objects)."""
        return cls(
            {g.name: g for g in groups},
            {t.name: t for t in tensors},
            {s.name: s for s in neuron_sets},
            tuple(identities),
            tuple(notes),
            tuple(norm_scales),
        )

    def _check_norm_scales(self) -> None:
        names: set[str] = set()
        for ns in self.norm_scales:
            where = f"norm scale {ns.name!r}"
            if ns.name in names:
                raise WeightSpaceError(f"{where} appears twice")
            names.add(ns.name)
            for tname, axis, power in ns.members:
                t = self.tensors.get(tname)
                if t is None:
                    raise WeightSpaceError(f"{where}: unknown tensor {tname!r}")
                if power not in (1, 2):
                    raise WeightSpaceError(f"{where}: tensor {tname!r} power must be 1 or 2")
                if axis is None and ns.size != 1:
                    raise WeightSpaceError(
                        f"{where}: tensor {tname!r} scales as a whole (axis null) but the "
                        f"scale has {ns.size} factors; use size 1 or name the row axis"
                    )
                if axis is not None and not (0 <= axis < len(t.shape) and t.shape[axis] == ns.size):
                    raise WeightSpaceError(
                        f"{where}: tensor {tname!r} axis {axis} does not have size {ns.size} "
                        f"(shape {t.shape})"
                    )

    def norm_scale_dims(self) -> int:
        """Independent positive scales the normalizations allow (one per factor)."""
        return sum(ns.size for ns in self.norm_scales)

    def _check(self) -> None:
        for g in self.groups.values():
            if g.within is not None:
                outer = self.groups.get(g.within)
                if outer is None:
                    raise WeightSpaceError(f"group {g.name!r} is within unknown group {g.within!r}")
                if outer.within is not None:
                    raise WeightSpaceError(
                        f"group {g.name!r}: nested indexing ({g.within!r} is itself indexed)"
                    )
        for s in self.neuron_sets.values():
            self._check_axis(s.axis, f"neuron set {s.name!r}")
        for t in self.tensors.values():
            if len(t.axes) != len(t.shape):
                raise WeightSpaceError(
                    f"tensor {t.name!r}: {len(t.axes)} axis specs for shape {tuple(t.shape)}"
                )
            for i, (a, n) in enumerate(zip(t.axes, t.shape)):
                where = f"tensor {t.name!r} axis {i}"
                if a.size != n:
                    raise WeightSpaceError(f"{where}: spec {a} has size {a.size}, shape says {n}")
                self._check_axis(a, where, tensor=t)
            for set_key, axis_key in (("out_set", "out_axis"), ("in_set", "in_axis")):
                sname, ax = getattr(t, set_key), getattr(t, axis_key)
                if sname is None:
                    continue
                if sname not in self.neuron_sets:
                    raise WeightSpaceError(f"tensor {t.name!r}: unknown {set_key} {sname!r}")
                if ax is None or not 0 <= ax < len(t.shape):
                    raise WeightSpaceError(f"tensor {t.name!r}: {axis_key}={ax} out of range")
                if t.axes[ax] != self.neuron_sets[sname].axis:
                    raise WeightSpaceError(
                        f"tensor {t.name!r} axis {ax} is {t.axes[ax]} but neuron set "
                        f"{sname!r} is {self.neuron_sets[sname].axis}"
                    )
            if t.in_set is not None and t.out_set is None:
                raise WeightSpaceError(f"tensor {t.name!r}: in_set without out_set")
        for a, b in self.identities:
            for s in (a, b):
                if s not in self.neuron_sets:
                    raise WeightSpaceError(f"identity ({a!r}, {b!r}): unknown neuron set {s!r}")
            if self.neuron_sets[a].axis != self.neuron_sets[b].axis:
                raise WeightSpaceError(
                    f"identity ({a!r}, {b!r}) joins different axes "
                    f"{self.neuron_sets[a].axis} and {self.neuron_sets[b].axis}"
                )

    def _check_axis(self, axis: Axis, where: str, tensor: TensorSpec | None = None) -> None:
        for seg in axis.segments:
            for j, f in enumerate(seg):
                if f.group is None:
                    continue
                g = self.groups.get(f.group)
                if g is None:
                    raise WeightSpaceError(f"{where}: unknown group {f.group!r}")
                if g.size != f.size:
                    raise WeightSpaceError(
                        f"{where}: group {f.group!r} has size {g.size}, factor says {f.size}"
                    )
                if g.within is None:
                    continue
                if any(h.group == g.within for h in seg[:j]):
                    continue
                other = tensor is not None and any(
                    g.within in a.groups for a in tensor.axes if a is not axis
                )
                if not other:
                    raise WeightSpaceError(
                        f"{where}: group {f.group!r} is indexed by {g.within!r}, which must "
                        "come earlier in the same segment or on another axis of the tensor"
                    )

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, name: str) -> TensorSpec:
        return self.tensors[name]

    @property
    def num_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def group_order_log10(self, name: str) -> float:
        """log10 of the order of one group (indexed groups count every copy)."""
        g = self.groups[name]
        copies = self.groups[g.within].size if g.within else 1
        return copies * math.lgamma(g.size + 1) / math.log(10)

    def free_dims(self, name: str | None = None) -> int:
        """Number of permuted points: ``size`` per group (times the outer size if indexed)."""
        names = [name] if name is not None else list(self.groups)
        total = 0
        for n in names:
            g = self.groups[n]
            total += g.size * (self.groups[g.within].size if g.within else 1)
        return total

    def tensors_of(self, group: str) -> list[str]:
        """Names of the tensors with an axis the group acts on."""
        return [t.name for t in self.tensors.values() if group in t.groups]

    # ------------------------------------------------------------------ group elements
    def identity(self) -> Element:
        out: Element = {}
        for g in self.groups.values():
            ar = torch.arange(g.size)
            out[g.name] = ar.expand(self.groups[g.within].size, g.size).clone() if g.within else ar
        return out

    def random_element(self, generator: torch.Generator | None = None) -> Element:
        """A uniformly random element of the full group."""
        out: Element = {}
        for g in self.groups.values():
            rows = self.groups[g.within].size if g.within else 1
            perm = torch.rand(rows, g.size, generator=generator).argsort(dim=1)
            out[g.name] = perm if g.within else perm[0]
        return out

    def _check_element(self, element: Mapping[str, Tensor]) -> None:
        for name, g in self.groups.items():
            if name not in element:
                raise WeightSpaceError(f"element has no permutation for group {name!r}")
            e = element[name]
            want = (self.groups[g.within].size, g.size) if g.within else (g.size,)
            if tuple(e.shape) != want:
                raise WeightSpaceError(
                    f"element[{name!r}] has shape {tuple(e.shape)}, expected {want}"
                )
            if e.dtype.is_floating_point or e.dtype.is_complex or e.dtype == torch.bool:
                raise WeightSpaceError(
                    f"element[{name!r}] has dtype {e.dtype}; a permutation is integer indices"
                )
            if e.device.type != "meta" and e.numel():
                # one sort per group: indices 0..size-1, each once (a non-permutation would
                # silently duplicate units; an index out of range would fail deep inside)
                ok = torch.equal(e.sort(dim=-1).values, torch.arange(g.size, device=e.device)
                                 .expand_as(e))  # fmt: skip
                if not ok:
                    raise WeightSpaceError(
                        f"element[{name!r}] is not a permutation of 0..{g.size - 1}"
                        + (" in every row" if g.within else "")
                    )

    def invert(self, element: Mapping[str, Tensor]) -> Element:
        """The inverse: ``apply(apply(w, g), invert(g)) == w``."""
        self._check_element(element)
        out: Element = {}
        for name, g in self.groups.items():
            if g.within is None:
                out[name] = element[name].argsort()
        for name, g in self.groups.items():
            if g.within is not None:
                # row h of the inverse undoes the row that now sits at h's source
                rows = element[name][out[g.within]]
                out[name] = rows.argsort(dim=1)
        return out

    def compose(self, first: Mapping[str, Tensor], then: Mapping[str, Tensor]) -> Element:
        """The element acting as ``first`` followed by ``then``."""
        self._check_element(first)
        self._check_element(then)
        out: Element = {}
        for name, g in self.groups.items():
            if g.within is None:
                out[name] = first[name][then[name]]
            else:
                src_rows = first[name][then[g.within]]  # (outer, size)
                out[name] = torch.gather(src_rows, 1, then[name])
        return out

    def _axis_index(
        self,
        axis: Axis,
        element: Mapping[str, Tensor],
        outer_index: Mapping[str, Tensor] | None = None,
    ) -> Tensor | None:
        """Gather index for one axis, or None if nothing on it moves.

        ``outer_index`` gives, for groups that index a group on this axis but live on
        another axis of the tensor, the (already permuted) coordinate tensor; the result
        then has a leading dimension over that coordinate.
        """
        if axis.is_fixed:
            return None
        if len(axis.segments) == 1 and len(axis.segments[0]) == 1:
            # the common axis, one plain group (hidden units): its permutation itself
            g = self.groups[axis.segments[0][0].group]
            if g.within is None:
                return element[g.name].to(torch.long, copy=True)
        pieces: list[Tensor] = []
        offset = 0
        for seg in axis.segments:
            sizes = [f.size for f in seg]
            n = math.prod(sizes)
            coords = torch.unravel_index(torch.arange(n), tuple(sizes)) if seg else ()
            new_coords: list[Tensor] = []
            for j, f in enumerate(seg):
                c = coords[j]
                g = self.groups[f.group] if f.group is not None else None
                if g is None:
                    new_coords.append(c)
                elif g.within is None:
                    new_coords.append(element[f.group][c])
                else:
                    k = next((i for i, h in enumerate(seg[:j]) if h.group == g.within), None)
                    if k is not None:
                        new_coords.append(element[f.group][coords[k], c])
                    else:
                        rows = element[f.group]  # (outer, size): one row per outer coordinate
                        new_coords.append(rows[:, c])
            flat = torch.zeros((), dtype=torch.long)
            for c, size in zip(new_coords, sizes):
                flat = flat * size + c
            pieces.append(flat.expand(*flat.shape[:-1], n) + offset if seg else flat)
            offset += n
        width = max(p.dim() for p in pieces)
        if width > 1:
            pieces = [
                p if p.dim() == 2 else p.expand(self.groups[self._cross_axis_outer(axis)].size, -1)
                for p in pieces
            ]
        return torch.cat(pieces, dim=-1)

    def _cross_axis_outer(self, axis: Axis) -> str | None:
        """The outer group of an indexed group on ``axis`` whose outer factor is not
        earlier in the same segment (it lives on another axis of the tensor)."""
        for seg in axis.segments:
            for j, f in enumerate(seg):
                g = self.groups.get(f.group) if f.group else None
                if g is not None and g.within and all(h.group != g.within for h in seg[:j]):
                    return g.within
        return None

    def apply(
        self, weights: Mapping[str, Tensor], element: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Act on weights (or batched weight features) with a group element.

        Tensors may carry leading batch/channel axes: the spec's axes are matched to the
        trailing dimensions. Tensors not in the space are returned unchanged.
        """
        self._check_element(element)
        out = dict(weights)
        for name in self.tensors:
            if name not in weights:
                raise WeightSpaceError(f"weights have no tensor {name!r}")
            out[name] = self._apply_tensor(name, weights[name], element)
        return out

    def apply_tensor(self, name: str, w: Tensor, element: Mapping[str, Tensor]) -> Tensor:
        """``apply`` for one tensor: what ``apply(weights, element)[name]`` would be.

        Lets streaming code permute a checkpoint one tensor at a time."""
        if name not in self.tensors:
            raise WeightSpaceError(f"the space has no tensor {name!r}")
        self._check_element(element)
        return self._apply_tensor(name, w, element)

    def _apply_tensor(self, name: str, w: Tensor, element: Mapping[str, Tensor]) -> Tensor:
        t = self.tensors[name]
        lead = w.dim() - len(t.shape)
        if lead < 0 or tuple(w.shape[lead:]) != t.shape:
            raise WeightSpaceError(
                f"tensor {name!r} has shape {tuple(w.shape)}, expected (..., "
                f"{', '.join(map(str, t.shape))})"
            )
        deferred: list[tuple[int, Axis, str]] = []
        for i, axis in enumerate(t.axes):
            outer = self._cross_axis_outer(axis)
            if outer is not None:
                deferred.append((i, axis, outer))
                continue
            idx = self._axis_index(axis, element)
            if idx is not None:
                w = w.index_select(lead + i, idx.to(w.device))
        for i, axis, outer in deferred:
            # one permutation of axis i per row; the row is the outer group's
            # (new) coordinate along the axis j that carries it
            j = next(k for k, a in enumerate(t.axes) if outer in a.groups)
            rows = self._axis_index(axis, element)  # (outer size, size_i)
            idx = rows[self._outer_coordinate(t.axes[j], outer)]  # (size_j, size_i)
            if j > i:
                idx = idx.T
            shape = [1] * w.dim()
            shape[lead + min(i, j)], shape[lead + max(i, j)] = idx.shape
            w = torch.gather(w, lead + i, idx.reshape(shape).expand(w.shape).to(w.device))
        return w

    def _outer_coordinate(self, axis: Axis, group: str) -> Tensor:
        """For each index of ``axis``, its coordinate in the factor of ``group``."""
        parts = []
        for seg in axis.segments:
            sizes = [f.size for f in seg]
            coords = torch.unravel_index(torch.arange(math.prod(sizes)), tuple(sizes))
            k = next((i for i, f in enumerate(seg) if f.group == group), None)
            if k is None:
                raise WeightSpaceError(f"segment {seg} of axis {axis} lacks group {group!r}")
            parts.append(coords[k])
        return torch.cat(parts)

    def set_index(self, name: str, element: Mapping[str, Tensor]) -> Tensor:
        """For neuron set ``name``: ``new neuron i`` is ``old neuron index[i]``."""
        axis = self.neuron_sets[name].axis
        idx = self._axis_index(axis, element)
        if idx is None:
            return torch.arange(axis.size)
        if idx.dim() != 1:
            raise WeightSpaceError(f"neuron set {name!r}: axis {axis} is indexed from outside")
        return idx

    # ------------------------------------------------------------------ validation
    def validate(self, weights: Mapping[str, Tensor], strict: bool = True) -> None:
        """Check names and shapes; errors name the tensor and axis at fault.

        With ``strict`` extra tensors not in the space are an error too.
        """
        missing = [n for n in self.tensors if n not in weights]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightSpaceError(f"weights lack tensor {missing[0]!r}{more}")
        if strict:
            extra = [n for n in weights if n not in self.tensors]
            if extra:
                raise WeightSpaceError(
                    f"weights have tensor {extra[0]!r} that the space does not describe"
                )
        for name, t in self.tensors.items():
            w = weights[name]
            if not isinstance(w, Tensor):
                raise WeightSpaceError(f"tensor {name!r} is a {type(w).__name__}, not a Tensor")
            if w.dim() != len(t.shape):
                raise WeightSpaceError(
                    f"tensor {name!r} has {w.dim()} axes {tuple(w.shape)}, expected "
                    f"{len(t.shape)} {t.shape}"
                )
            for i, (got, want) in enumerate(zip(w.shape, t.shape)):
                if got != want:
                    raise WeightSpaceError(
                        f"tensor {name!r} axis {i} ({t.axes[i]}) has size {got}, expected {want}"
                    )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return {
            "format": "metanet.WeightSpace/1",
            "groups": {
                g.name: {
                    k: v
                    for k, v in (("size", g.size), ("within", g.within), ("action", g.action))
                    if v is not None
                }
                for g in self.groups.values()
            },
            "neuron_sets": {
                s.name: {"axis": s.axis.to_json(), "kind": s.kind, "layer": s.layer}
                for s in self.neuron_sets.values()
            },
            "tensors": {t.name: t.to_json() for t in self.tensors.values()},
            "identities": [list(p) for p in self.identities],
            "notes": list(self.notes),
        } | (
            {"norm_scales": {ns.name: ns.to_json() for ns in self.norm_scales}}
            if self.norm_scales
            else {}
        )

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping) -> WeightSpace:
        fmt = d.get("format")
        if fmt != "metanet.WeightSpace/1":
            raise WeightSpaceError(f"not a metanet WeightSpace (format={fmt!r})")
        return cls(
            groups={
                n: Group(n, int(g["size"]), g.get("within"), g.get("action"))
                for n, g in d["groups"].items()
            },
            tensors={n: TensorSpec.from_json(n, t) for n, t in d["tensors"].items()},
            neuron_sets={
                n: NeuronSet(
                    n, Axis.from_json(s["axis"]), s.get("kind", "hidden"), s.get("layer", 0)
                )
                for n, s in d.get("neuron_sets", {}).items()
            },
            identities=tuple(tuple(p) for p in d.get("identities", [])),
            notes=tuple(d.get("notes", [])),
            norm_scales=tuple(
                NormScale.from_json(n, ns) for n, ns in d.get("norm_scales", {}).items()
            ),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> WeightSpace:
        """Parse :meth:`to_json`'s text; a field of the wrong type (``"size": "abc"``,
        ``128.7``, a list for an object) is a :class:`WeightSpaceError` naming it."""
        from metanet.space_schema import check_space_dict

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WeightSpaceError(f"WeightSpace JSON is malformed: {e}") from None
        except RecursionError:
            raise WeightSpaceError("WeightSpace JSON is nested too deeply") from None
        check_space_dict(data)
        space = cls.from_dict(data)
        space._check_bounded()
        return space

    def _check_bounded(self) -> None:
        """A space read from a file names no group and no neuron set larger than its
        tensors hold values (or a million): otherwise a 100 KB header could ask ``random_element()`` or
        a matching for petabytes (a group a tensor uses is bounded by its axis already;
        an unused one, or a neuron set, by nothing else)."""
        used = {
            f.group
            for t in self.tensors.values()
            for a in t.axes
            for seg in a.segments
            for f in seg
            if f.group is not None
        }
        # a million points (8 MB per permutation) is allowed whatever the tensors hold
        limit = max(1 << 20, self.num_params)
        for g in self.groups.values():
            if g.size > limit:
                what = "" if g.name in used else " and acts on no tensor"
                raise WeightSpaceError(
                    f"group {g.name!r} has size {g.size:,}{what}, more than the space's "
                    f"{limit:,} values; refusing a WeightSpace that would allocate for it"
                )
        for ns in self.neuron_sets.values():
            if ns.axis.size > limit:
                raise WeightSpaceError(
                    f"neuron set {ns.name!r} has {ns.axis.size:,} neurons, more than the "
                    f"space's {limit:,} values"
                )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightSpace):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A readable table: groups, sizes, tensors per group, free dimensions."""
        lines = [
            f"WeightSpace: {len(self.tensors)} tensors, {self.num_params:,} values, "
            f"{_plural(len(self.groups), 'group')}, {_plural(len(self.neuron_sets), 'neuron set')}, "
            f"{self.free_dims()} free permutation dims "
            f"(log10 |G| = {sum(self.group_order_log10(g) for g in self.groups):.1f})",
        ]
        if self.groups:
            w = max(5, *(len(g) for g in self.groups))
            lines.append(f"  {'group':<{w}}  {'size':>6}  {'action':<14}  tensors")
            for g in self.groups.values():
                size = f"{self.groups[g.within].size}×{g.size}" if g.within else str(g.size)
                names = self.tensors_of(g.name)
                shown = ", ".join(names[:4]) + (
                    f", … (+{len(names) - 4})" if len(names) > 4 else ""
                )
                lines.append(f"  {g.name:<{w}}  {size:>6}  {g.action or '-':<14}  {shown}")
        fixed = [
            f"{t.name}[{i}]"
            for t in self.tensors.values()
            for i, a in enumerate(t.axes)
            if a.is_fixed and i in (t.out_axis, t.in_axis)
        ]
        if fixed:
            lines.append(
                f"  fixed neuron axes: {', '.join(fixed[:8])}" + (" …" if len(fixed) > 8 else "")
            )
        if self.norm_scales:
            rows = sum(ns.size > 1 for ns in self.norm_scales)
            lines.append(
                f"  norm scale invariance: {_plural(len(self.norm_scales), 'set')} "
                f"({rows} per channel), {self.norm_scale_dims()} dims: "
                + ", ".join(ns.name for ns in self.norm_scales[:4])
                + (" …" if len(self.norm_scales) > 4 else "")
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"WeightSpace(tensors={len(self.tensors)}, groups={len(self.groups)}, "
            f"neuron_sets={len(self.neuron_sets)}, free_dims={self.free_dims()})"
        )
