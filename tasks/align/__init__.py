"""Git Re-Basin alignment for any :class:`~metanet.WeightSpace`.

``weight_matching(space, a, b)`` finds a group element ``g`` such that
``space.apply(b, g)`` is as close to ``a`` as the symmetry allows (maximizing
``sum_t <a_t, (g·b)_t>``), by coordinate descent over the space's groups with one linear
assignment per group (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023). Nothing is
written per architecture: every tensor is cut into *views*, one per choice of segment on
each axis, whose dimensions are the axis factors, each labelled with its group (or fixed).
A group's step sums, over all views it appears in, the inner products between a's slices
and b's slices along its dimension, with every other dimension of b already permuted by
the current element. The groups are visited from the network's inputs to its outputs,
starting from a *construction* (each group solved once from the tensors whose other
groups are already solved), so that a relabelled copy of a network is recovered exactly;
see :func:`weight_matching`.

Per-head groups (``Group(within=outer)``) are solved jointly with their outer group: for
every pair (head i of a, head j of b) the best within-head permutation is its own
assignment problem, and the heads are then matched on those pair values. That is the
wreath product of attention, matched exactly, not head_dim after heads.

``activation_matching`` does the same on standardized activations (correlation), and
``ste_matching`` is the paper's straight-through estimator, which learns the weights the
permutation is matched to so that the merged midpoint has low loss.

Which to use: on MLPs and CNNs weight matching is fast, data-free and close to the best.
On transformers the weights of independently trained models are too weakly correlated for
it (different visiting orders land on unrelated permutations, and the objective barely
predicts the barrier); there ``ste_matching(..., init="activation", lr=1e-2, epochs=10)``
is the one that removes most of the barrier.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from metanet.shards import LazyWeights
from metanet.space import Axis, Element, TensorSpec, WeightSpace, WeightSpaceError

__all__ = [
    "AlignmentError",
    "MatchLog",
    "weight_matching",
    "activation_matching",
    "ste_matching",
    "check_same_architecture",
    "matchable",
    "verify_aligned",
]


# "same function?": the largest relative output change a relabelling may show, by the
# dtype the model runs in (a permutation only reorders sums: this is rounding, not error).
# Every such check (verify_aligned, the CLI, the engine's align stage) reads this table.
FUNCTION_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


class AlignmentError(WeightSpaceError):
    """Two checkpoints cannot be aligned (different architectures, bad inputs)."""


@dataclass
class MatchLog:
    """What a matching run did: objective after every sweep, time, groups solved."""

    objective: list[float] = field(default_factory=list)
    sweeps: int = 0
    seconds: float = 0.0
    groups: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- views
@dataclass
class _View:
    """One segment choice of one tensor, reshaped so every axis factor is a dimension."""

    tensor: str
    index: tuple  # slices into the tensor
    shape: tuple[int, ...]  # factor sizes
    labels: tuple[str | None, ...]  # group per dimension (None: fixed)
    axis_of: tuple[int, ...]  # tensor axis each dimension comes from
    seg_of: tuple[int, ...]  # position of the dimension inside its segment

    def take(self, w: Tensor) -> Tensor:
        return w[self.index].reshape(self.shape)


def _views(space: WeightSpace, names: Iterable[str]) -> dict[str, list[_View]]:
    out: dict[str, list[_View]] = {}
    for name in names:
        views = []
        for ranges, segs in space.tensors[name].blocks():
            shape, labels, axis_of, seg_of = [], [], [], []
            for i, seg in enumerate(segs):
                for j, f in enumerate(seg):
                    shape.append(f.size)
                    labels.append(f.group)
                    axis_of.append(i)
                    seg_of.append(j)
            if any(lab is not None for lab in labels) and math.prod(shape) > 0:
                views.append(
                    _View(
                        name,
                        tuple(slice(a, b) for a, b in ranges),
                        tuple(shape),
                        tuple(labels),
                        tuple(axis_of),
                        tuple(seg_of),
                    )
                )
        if views:
            out[name] = views
    return out


def _outer_dim(space: WeightSpace, view: _View, d: int) -> int:
    """The dimension of ``view`` carrying the outer group of the indexed group at ``d``."""
    outer = space.groups[view.labels[d]].within
    ax = view.axis_of[d]
    for e in range(d - 1, -1, -1):  # earlier in the same segment
        if view.axis_of[e] != ax or view.seg_of[e] >= view.seg_of[d]:
            break
        if view.labels[e] == outer:
            return e
    for e, lab in enumerate(view.labels):  # else on another axis (first one)
        if lab == outer and view.axis_of[e] != ax:
            return e
    raise AlignmentError(f"{view.tensor}: indexed group {view.labels[d]!r} without its outer")


def _gather_rows(w: Tensor, d: int, e: int, rows: Tensor) -> Tensor:
    """``out[..., h@e, ..., x@d, ...] = w[..., h, ..., rows[h, x], ...]``."""
    shape = [1] * w.dim()
    if e < d:
        shape[e], shape[d] = rows.shape
        idx = rows
    else:
        shape[d], shape[e] = rows.shape[1], rows.shape[0]
        idx = rows.T
    return torch.gather(w, d, idx.reshape(shape).expand(w.shape))


def _permute_view(
    space: WeightSpace,
    view: _View,
    w: Tensor,
    g: Mapping[str, Tensor],
    skip: set[int] = frozenset(),
    carried: Mapping[int, Tensor] | None = None,
) -> Tensor:
    """Apply ``g`` to a view tensor on every labelled dimension except ``skip``.

    ``carried[d]`` overrides the rows used for an indexed dimension whose outer
    dimension is skipped: rows are then looked up by the *old* outer coordinate.
    """
    indexed = []
    for d, lab in enumerate(view.labels):
        if lab is None or d in skip:
            continue
        if space.groups[lab].within is None:
            w = w.index_select(d, g[lab])
        else:
            indexed.append(d)
    for d in indexed:
        e = _outer_dim(space, view, d)
        rows = carried[d] if carried and d in carried else g[view.labels[d]]
        w = _gather_rows(w, d, e, rows)
    return w


# --------------------------------------------------------------------------- solving
_CHUNK = 1 << 20  # elements per float64 chunk of the objective
# a start whose objective is within this share of the Cauchy-Schwarz bound sum_v |a_v||b_v|
# is optimal for every purpose (a relabelled copy with 1% noise ends ~5e-5 below it):
# weight matching then tries no other start
_CERTIFIED = 1e-3
# with several starts, each descends until a sweep gains less than this share; only the
# best is descended on to ``tol`` (most of a descent's sweeps are its last 0.1%)
_RACE_TOL = 1e-3


def _lap(cost: np.ndarray) -> tuple[np.ndarray, float]:
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols, float(cost[rows, cols].sum())


class _Matcher:
    """Coordinate descent over a space's groups for fixed a and (unpermuted) b views."""

    def __init__(
        self,
        space: WeightSpace,
        a: Mapping[str, Tensor],
        b: Mapping[str, Tensor],
        names: Iterable[str],
        device: torch.device | None = None,
    ):
        self.space = space
        # cost matrices are accumulated on the device of the weights (a GPU: the matmuls)
        # and solved on the CPU (scipy's assignment)
        self.device = device
        names = list(names)
        self.views = _views(space, names)
        self.a, self.b = a, b
        if isinstance(a, LazyWeights):
            stored = a.info(names[0])[1] if names else torch.float32
            self.dtype = a.upcast if a.upcast and stored.itemsize < 4 else stored
        else:
            self.dtype = next(iter(a.values())).dtype if a else torch.float32
        self.inners: dict[str, list[str]] = {n: [] for n in space.groups}
        for g in space.groups.values():
            if g.within is not None:
                self.inners[g.within].append(g.name)
        self.touching: dict[str, list[_View]] = {n: [] for n in space.groups}
        for views in self.views.values():
            for v in views:
                for lab in set(v.labels) - {None}:
                    top = space.groups[lab].within or lab
                    if v not in self.touching[top]:
                        self.touching[top].append(v)

    def _on_device(self, g: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.device is None:
            return dict(g)
        return {k: v.to(self.device, non_blocking=True) for k, v in g.items()}

    def step(self, outer: str, g: dict[str, Tensor], views: Iterable[_View] | None = None) -> float:
        """Re-solve ``outer`` (and the groups within it); returns the objective gain.

        ``views``: only these of the group's views count (default: all it touches); the
        gain is then the gain on those views."""
        space = self.space
        n = space.groups[outer].size
        inners = self.inners[outer]
        cpu_g, g = g, self._on_device(g)
        # accumulated in the weights' precision (at least float32), solved in float64
        dtype = torch.promote_types(self.dtype, torch.float32)
        k_outer = torch.zeros(n, n, dtype=dtype, device=self.device)
        k_inner = {
            name: torch.zeros(
                n, n, space.groups[name].size, space.groups[name].size, dtype=dtype,
                device=self.device,
            )
            for name in inners
        }  # fmt: skip
        inv_outer = g[outer].argsort()
        for view in self.touching[outer] if views is None else views:
            a = view.take(self.a[view.tensor].to(self.device or "cpu"))
            b = view.take(self.b[view.tensor].to(self.device or "cpu"))
            family = {
                d
                for d, lab in enumerate(view.labels)
                if lab == outer or (lab is not None and lab in inners)
            }
            # everything outside this group's family takes its current permutation
            b = _permute_view(space, view, b, g, skip=family)
            occurrences = [d for d in family if view.labels[d] == outer]
            attached = {o: [] for o in occurrences}
            for d in sorted(family - set(occurrences)):
                attached[_outer_dim(space, view, d)].append(d)
            for o in occurrences:
                # the other occurrences keep the current permutation (linearization)
                bo = b
                for o2 in occurrences:
                    if o2 == o:
                        continue
                    bo = bo.index_select(o2, g[outer])
                    for d in attached[o2]:
                        bo = _gather_rows(bo, d, o2, g[view.labels[d]])
                free = attached[o][:1]
                for d in attached[o][1:]:  # extra per-head dims ride with the old head
                    bo = _gather_rows(bo, d, o, g[view.labels[d]][inv_outer])
                if not free:
                    am = a.movedim(o, 0).reshape(n, -1)
                    bm = bo.movedim(o, 0).reshape(n, -1)
                    k_outer.addmm_(am.to(dtype), bm.to(dtype).T)
                else:
                    d = free[0]
                    m = view.shape[d]
                    am = a.movedim((o, d), (0, 1)).reshape(n, m, -1)
                    bm = bo.movedim((o, d), (0, 1)).reshape(n, m, -1)
                    k_inner[view.labels[d]] += torch.einsum("ixr,jyr->ijxy", am, bm).to(dtype)
        return self._solve(
            outer,
            inners,
            k_outer.double().cpu(),
            {k: v.double().cpu() for k, v in k_inner.items()},
            cpu_g,
        )

    @staticmethod
    def _solve(outer, inners, k_outer, k_inner, g) -> float:
        n = k_outer.shape[0]
        old = float(k_outer[torch.arange(n), g[outer]].sum())
        pair = k_outer.numpy()  # a fresh local: the head-pair values are added in place
        best: dict[str, np.ndarray] = {}
        for name in inners:
            k = k_inner[name]
            ar = torch.arange(k.shape[2])
            old += float(k[torch.arange(n)[:, None], g[outer][:, None], ar, g[name]].sum())
            kn = k.numpy()
            sols = np.empty((n, n, k.shape[2]), dtype=np.int64)
            for i in range(n):
                for j in range(n):
                    cols, val = _lap(kn[i, j])
                    sols[i, j] = cols
                    pair[i, j] += val
            best[name] = sols
        cols, new = _lap(pair)
        if new <= old + 1e-12 * max(1.0, abs(old)):
            return 0.0  # keep the current element on ties
        g[outer] = torch.as_tensor(cols, dtype=torch.long)
        for name in inners:
            g[name] = torch.as_tensor(best[name][np.arange(n), cols], dtype=torch.long)
        return new - old

    def _top(self, label: str) -> str:
        return self.space.groups[label].within or label

    def _self_coupled(self, outer: str, view: _View) -> bool:
        """Whether ``outer``'s step on ``view`` reads ``outer``'s own current permutation:
        the group on two dimensions of it (a recurrent matrix), or more per-head dimensions
        than occurrences."""
        labels = [lab for lab in view.labels if lab is not None]
        occ = sum(lab == outer for lab in labels)
        inner = sum(lab != outer and self._top(lab) == outer for lab in labels)
        return occ > 1 or inner > occ

    def informed(self, outer: str, known: set[str]) -> list[_View]:
        """The views of ``outer`` whose every other dimension is fixed or in ``known``:
        there the group's assignment problem does not depend on anything still unsolved."""
        return [
            v
            for v in self.touching[outer]
            if not self._self_coupled(outer, v)
            and all(lab is None or self._top(lab) in known or self._top(lab) == outer
                    for lab in v.labels)
        ]  # fmt: skip

    def order(self, todo: Iterable[str]) -> list[str]:
        """``todo`` from the network's inputs to its outputs.

        By the first neuron set (the space lists them in forward order) that carries the
        group or a group within it, then by the first tensor (state-dict order) that
        touches it: a space without neuron sets (activation matching's) keeps tensor order.
        """
        space = self.space
        first_set: dict[str, int] = {}
        for i, ns in enumerate(space.neuron_sets.values()):
            for lab in ns.axis.groups:
                first_set.setdefault(self._top(lab), i)
        first_tensor: dict[str, int] = {}
        for i, t in enumerate(space.tensors.values()):
            for lab in t.groups:
                first_tensor.setdefault(self._top(lab), i)
        n_sets, n_tensors = len(space.neuron_sets), len(space.tensors)
        return sorted(
            todo, key=lambda n: (first_set.get(n, n_sets), first_tensor.get(n, n_tensors))
        )

    def construct(self, order: list[str], g: dict[str, Tensor], known: set[str]) -> None:
        """Solve every group of ``order`` once, inputs to outputs, each from its informed
        views only (:meth:`informed`; ``known`` grows as groups are solved).

        From the identity, a group's views into neighbours not yet solved are noise: in a
        random network a 1x1 projection or a squeeze-excitation gate (kaiming init, fan-out
        4-16) has entries 3-6x those of the stem conv, and its wrong inner products outvote
        the stem's right ones. Here a group only sees tensors whose other axes are fixed
        or already solved. A group with no informed view (a cycle) takes the next turn
        with all its views, its unsolved neighbours held where they are."""
        remaining = list(order)
        while remaining:
            name, views = remaining[0], None
            for n in remaining:
                informed = self.informed(n, known)
                if informed:
                    name, views = n, informed
                    break
            self.step(name, g, views)
            known.add(name)
            remaining.remove(name)

    def readers(self, todo: Iterable[str]) -> dict[str, list[str]]:
        """For each group of ``todo``, the groups of ``todo`` whose step reads its permutation.

        A step holds every other group in the views it reads at its current permutation,
        and its own where it occurs twice in a view (or carries more than one per-head
        dimension per occurrence): only then does its assignment problem change.
        """
        todo = list(todo)
        reads: dict[str, set[str]] = {}
        for x in todo:
            r, itself = set(), False
            for v in self.touching[x]:
                r.update(self._top(lab) for lab in v.labels if lab is not None)
                itself = itself or self._self_coupled(x, v)
            reads[x] = r if itself else r - {x}
        return {y: [x for x in todo if y in reads[x]] for y in todo}

    def objective(self, g: Mapping[str, Tensor], bound: bool = False):
        """``sum_v <a_v, (g·b)_v>`` over the views; with ``bound``, ``(objective,
        sum_v |a_v| |b_v|)``: no element can score above the second (Cauchy-Schwarz)."""
        total = top = 0.0
        g = self._on_device(g)
        where = self.device or "cpu"
        for views in self.views.values():
            for v in views:
                bw = _permute_view(self.space, v, v.take(self.b[v.tensor].to(where)), g)
                bw = bw.reshape(-1)
                aw = v.take(self.a[v.tensor].to(where)).reshape(-1)
                # in float64 a chunk at a time: a whole embedding in float64 was the peak
                sums = [0.0, 0.0, 0.0]
                for i in range(0, aw.numel(), _CHUNK):
                    ac, bc = aw[i : i + _CHUNK].double(), bw[i : i + _CHUNK].double()
                    sums[0] += float(torch.dot(ac, bc))
                    if bound:
                        sums[1] += float(torch.dot(ac, ac))
                        sums[2] += float(torch.dot(bc, bc))
                total += sums[0]
                top += math.sqrt(sums[1] * sums[2])
        return (total, top) if bound else total


def matchable(space: WeightSpace, weights: Mapping[str, Tensor]) -> list[str]:
    """Tensors weight matching reads: floating-point parameters (not running statistics)."""
    return [
        n
        for n, t in space.tensors.items()
        if t.kind == "parameter" and n in weights and _dtype(weights, n).is_floating_point
    ]


def _dtype(weights: Mapping[str, Tensor], name: str) -> torch.dtype:
    if isinstance(weights, LazyWeights):  # from the header, nothing read
        return weights.info(name)[1]
    return weights[name].dtype


def _shape(weights: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    if isinstance(weights, LazyWeights):
        return weights.shape(name)
    return tuple(weights[name].shape)


def check_same_architecture(
    space: WeightSpace, weights_a: Mapping[str, Tensor], weights_b: Mapping[str, Tensor]
) -> None:
    """Raise :class:`AlignmentError` naming the first tensor where a and b differ."""
    for name, t in space.tensors.items():
        for label, w in (("a", weights_a), ("b", weights_b)):
            if name not in w:
                raise AlignmentError(f"checkpoint {label} has no tensor {name!r}")
            if _shape(w, name) != t.shape:
                raise AlignmentError(
                    f"tensor {name!r}: checkpoint {label} has shape {_shape(w, name)}, "
                    f"the space says {t.shape} (different architectures?)"
                )


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


SCHEDULES = ("structure", "random")


def weight_matching(
    space: WeightSpace,
    weights_a: Mapping[str, Tensor],
    weights_b: Mapping[str, Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    init: Mapping[str, Tensor] | None = None,
    groups: Iterable[str] | None = None,
    tensors: Iterable[str] | None = None,
    progress: bool = False,
    log: MatchLog | None = None,
    device: str | torch.device | None = None,
    schedule: str = "structure",
    construct: bool | None = None,
    restarts: int | None = None,
    tol: float = 1e-7,
) -> Element:
    """Permute ``b`` towards ``a``: returns ``g`` with ``space.apply(weights_b, g) ≈ a``.

    Coordinate descent over the outer groups (per-head groups ride with their outer), each
    step one linear assignment with the other groups held, maximizing
    ``sum_t <a_t, (g·b)_t>``. With ``schedule="structure"`` (the default):

    * **Order from the structure.** Groups are visited from the network's inputs to its
      outputs (the neuron sets' forward order, then tensor order), every sweep.
    * **Construction.** A start is built by solving every group once in that order, each
      from the tensors whose other axes are fixed or already solved. From the identity a
      group would also read tensors into neighbours still at an arbitrary permutation:
      pure noise, which in a random EfficientNet (squeeze-excitation gates and 1x1
      projections with entries 3-6x the stem's) outvotes the signal, so the old loop got
      4 of its 40 groups.
    * **Restarts kept by objective.** By default two starts: construction from the inputs
      and from the outputs (on trained pairs the readout side often says more). Each
      descends until a sweep gains less than 0.1% (``_RACE_TOL``); the best goes on to
      ``tol``. A start within 0.1% of the Cauchy-Schwarz bound ``sum_v |a_v| |b_v|``
      skips the others (a relabelled copy: nothing can beat it). The result is never
      below ``init``'s objective.
    * **Relative tolerance.** A descent stops after a sweep that gains at most
      ``tol * |objective|``, or after ``max_sweeps`` sweeps.

    ``schedule="random"`` is the previous loop: from ``init``, the groups in a random
    order (``seed``) every sweep, until a sweep no longer improves.

    Memory is the same either way: a step reads the tensors of one group (from disk with
    :class:`~metanet.shards.LazyWeights`), builds its cost matrices and keeps only the
    permutations; a start costs one more element (index tensors) and one more pass over
    the tensors for its objective.

    Args:
        max_sweeps: at most this many sweeps per start (construction counts as one).
        seed: the random schedule's order; the random starts of ``restarts > 2``.
        init: start element (default identity). Given, it is where the descent starts
            (no construction unless ``construct=True``; one start unless ``restarts``):
            a warm start stays warm.
        groups: the outer groups to optimize (default all); the others keep ``init``
            (and are known to the construction from the start).
        tensors: tensors whose inner products count (default :func:`matchable`).
        progress: a progress bar over sweeps.
        log: filled with the best objective so far after each sweep, the time taken and
            notes on which start was kept.
        device: where the similarity (cost) matrices are computed (default: the CPU, or
            the weights' device); each assignment is solved on the CPU (scipy). The
            element returned is on the CPU.
        schedule: ``"structure"`` or ``"random"`` (see above).
        construct: start by construction (default: when ``init`` is None; structure only).
        restarts: starts beyond the first (default 1 with construction, else 0), in
            turn: construction from the inputs, from the outputs, ``init`` itself, then
            random elements. Without construction ``init`` comes first (structure only).
        tol: the relative tolerance (structure only).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    start = time.perf_counter()
    check_same_architecture(space, weights_a, weights_b)
    names = list(tensors) if tensors is not None else matchable(space, weights_a)
    if isinstance(weights_a, LazyWeights) and isinstance(weights_b, LazyWeights):
        # streaming: each step reads the tensors it needs from disk (cast on read)
        a, b = weights_a, weights_b
    else:
        a = {n: weights_a[n].detach() for n in names}
        b = {n: weights_b[n].detach().to(a[n].dtype) for n in names}
    if device is None and names and not isinstance(weights_a, LazyWeights):
        device = a[names[0]].device
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cpu":
        device = None
    if device is not None and not isinstance(weights_a, LazyWeights):
        a = {n: t.to(device) for n, t in a.items()}
        b = {n: t.to(device) for n, t in b.items()}
    matcher = _Matcher(space, a, b, names, device)
    g = {k: v.detach().cpu().clone() for k, v in (init or space.identity()).items()}
    outer = [n for n, grp in space.groups.items() if grp.within is None]
    todo = outer
    if groups is not None:
        wanted = set(groups)
        todo = [n for n in todo if n in wanted]
    todo = [
        n for n in todo if matcher.touching[n] and (space.groups[n].size > 1 or matcher.inners[n])
    ]
    rng = np.random.default_rng(seed)
    log = log if log is not None else MatchLog()
    log.groups = len(todo)
    base, bound = 0.0, 0.0
    if todo and schedule == "random":
        base = matcher.objective(g)
    elif todo:
        base, bound = matcher.objective(g, bound=True)
    log.objective.append(base)
    # the bar counts group solves; its total is the solves of the sweeps begun so far (a
    # sweep limit is no estimate of when matching ends: it stops when a sweep no longer
    # improves), so it shows the current sweep's ETA and the sweep count, no false one
    bar = _progress(None, progress, desc="weight matching", unit="group") if progress else None
    kept = [base]  # the best objective of any element so far (init's to begin with)

    def record(value: float) -> None:
        # the log is the best objective so far after every sweep (of any start)
        kept[0] = max(kept[0], value)
        log.sweeps += 1
        log.objective.append(kept[0])
        if bar is not None:
            bar.set_postfix(sweep=log.sweeps, objective=f"{kept[0]:.4g}")

    # a group is re-solved only when a permutation its problem reads has changed since
    # its last solve; otherwise the same problem has the same answer (it would gain 0)
    readers = matcher.readers(todo)
    coupled = any(
        sum(lab is not None and matcher._top(lab) == name for lab in v.labels) > 1
        for name in todo
        for v in matcher.touching[name]
    )

    def descend(g: dict[str, Tensor], value: float, visit, sweeps: int, done):
        """Sweeps until ``done(gain, value)``: (element, objective, last gain, sweeps)."""
        stale = set(todo)
        best = {k: v.clone() for k, v in g.items()}
        gain, done_sweeps = math.inf, 0
        for _ in range(sweeps):
            done_sweeps += 1
            gain = 0.0
            if bar is not None:
                bar.total = bar.n + len(stale)
                bar.refresh()
            for name in visit():
                name = str(name)
                if name not in stale:
                    continue
                stale.discard(name)
                step_gain = matcher.step(name, g)
                if bar is not None:
                    bar.update()
                if step_gain > 0:
                    stale.update(readers[name])
                gain += step_gain
            if coupled:
                # a group on two axes of one tensor (a recurrent matrix) is solved with its
                # other occurrence held: the step gains are then not the objective's change,
                # so the sweep is judged on the true objective and undone if it lost
                new = matcher.objective(g)
                gain = new - value
                if gain <= 0:
                    record(value)
                    return best, value, 0.0, done_sweeps
                best = {k: v.clone() for k, v in g.items()}
                value = new
            else:
                value += gain
            record(value)
            if done(gain, value):
                break
        return g, value, gain, done_sweeps

    if schedule == "random" or not todo:
        # the previous loop: from init, a random order every sweep, until no gain
        g, *_ = descend(
            g,
            base,
            lambda: rng.permutation(todo),
            max_sweeps,
            lambda gain, value: gain <= 1e-9 * max(1.0, abs(value)),
        )
    else:
        order = matcher.order(todo)
        held = set(outer) - set(todo)
        if construct is None:
            construct = init is None
        if restarts is None:
            restarts = 1 if construct else 0
        # the starts, in turn: construction from the inputs, construction from the outputs
        # (on trained pairs the readout side often says more: it won on every MLP pair of
        # the main job), init itself, then random elements
        starts = ["forward", "backward", "init"] if construct else ["init", "forward", "backward"]
        starts = (starts + [f"random {k}" for k in range(3, 1 + restarts)])[: 1 + restarts]
        if (
            construct
            and not coupled
            and all(
                len({matcher._top(lab) for lab in v.labels if lab is not None}) == 1
                for name in todo
                for v in matcher.touching[name]
            )
        ):
            # no tensor ties two groups (activation matching's space): one construction is
            # the optimum, whatever the order
            starts = starts[:1]
        best_g, best, last, used = g, base, 0.0, 0  # never below where it started
        race = max(tol, _RACE_TOL) if len(starts) > 1 else tol

        def loose(gain: float, value: float) -> bool:
            return gain <= race * abs(value)

        for k, how in enumerate(starts):
            if max_sweeps <= 0:
                break
            if k and best >= bound - _CERTIFIED * abs(bound):
                # within _CERTIFIED of the bound no other start can do (noticeably) better
                log.notes.append(f"{len(starts) - k} start(s) skipped: objective within "
                                 f"{_CERTIFIED:g} of its bound")  # fmt: skip
                break
            sweeps = max_sweeps
            if how in ("forward", "backward"):
                trial = {key: t.clone() for key, t in g.items()}
                matcher.construct(order if how == "forward" else order[::-1], trial, set(held))
                value = matcher.objective(trial)
                record(value)
                sweeps -= 1
            elif how == "init":
                trial, value = {key: t.clone() for key, t in g.items()}, base
            else:
                rand = space.random_element(torch.Generator().manual_seed(seed * 7919 + k))
                trial = {key: rand[key] if (space.groups[key].within or key) in todo else t.clone()
                         for key, t in g.items()}  # fmt: skip
                value = matcher.objective(trial)
            # several starts race to a loose tolerance; the best is then descended to tol
            trial, value, gain, n = descend(trial, value, lambda: order, sweeps, loose)
            if value > best:
                if k:
                    log.notes.append(f"start {k + 1} ({how}) kept: objective {value:.6g}")
                best_g, best, last, used = trial, value, gain, max_sweeps - sweeps + n
        if best_g is g and "init" not in starts and max_sweeps > 0:
            # every start ended below init's objective: descend from init after all
            trial = {key: t.clone() for key, t in g.items()}
            best_g, best, last, used = descend(trial, base, lambda: order, max_sweeps, loose)
        g = best_g
        if last > tol * abs(best) and used < max_sweeps:  # the race stopped short of tol
            g, *_ = descend(
                g, best, lambda: order, max_sweeps - used, lambda gain, v: gain <= tol * abs(v)
            )
    if bar is not None:
        bar.close()
    log.seconds = time.perf_counter() - start
    return g


# --------------------------------------------------------------------------- activations
_CHANNEL_DIM = {
    nn.Linear: -1,
    nn.Embedding: -1,
    nn.LayerNorm: -1,
    nn.Conv1d: 1,
    nn.Conv2d: 1,
    nn.Conv3d: 1,
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 1,
    nn.BatchNorm3d: 1,
    nn.GroupNorm: 1,
}


def _capture_points(model: nn.Module, space: WeightSpace) -> dict[str, tuple[str, int]]:
    """module name -> (tensor whose out axis the module's output carries, channel dim)."""
    points = {}
    for mname, mod in model.named_modules():
        dim = next((d for cls, d in _CHANNEL_DIM.items() if isinstance(mod, cls)), None)
        pname = f"{mname}.weight" if mname else "weight"
        t = space.tensors.get(pname)
        if dim is None or t is None or t.out_axis is None:
            continue
        if not t.axes[t.out_axis].is_fixed:
            points[mname] = (pname, dim)
    return points


@torch.no_grad()
def _activations(model, points, data, max_samples, seed) -> dict[str, Tensor]:
    feats: dict[str, list[Tensor]] = {m: [] for m in points}
    hooks = []
    modules = dict(model.named_modules())
    for mname, (_, dim) in points.items():

        def hook(_mod, _inp, out, mname=mname, dim=dim):
            if isinstance(out, tuple):
                out = out[0]
            feats[mname].append(out.detach().movedim(dim, 0).reshape(out.shape[dim], -1).float())

        hooks.append(modules[mname].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for batch in data:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m, chunks in feats.items():
        if not chunks:
            continue
        f = torch.cat(chunks, dim=1)
        if f.shape[1] > max_samples:
            f = f[:, torch.randperm(f.shape[1], generator=gen)[:max_samples]]
        f = f - f.mean(dim=1, keepdim=True)
        out[m] = f / (f.norm(dim=1, keepdim=True) + 1e-8)  # rows: unit-norm -> correlation
    return out


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    space: WeightSpace,
    data: Iterable,
    *,
    max_samples: int = 50_000,
    seed: int = 0,
    log: MatchLog | None = None,
) -> Element:
    """Permute ``model_b`` towards ``model_a`` by correlating their activations.

    Activations are read at the outputs of every Linear / Conv / Embedding / norm module
    whose weight's output axis is permuted (each output channel standardized over the
    data, so the inner products are correlations). Groups that no captured activation
    reaches (for example a group only on a reshaped or concatenated axis) are then
    weight-matched with the activation-matched groups held.

    ``data`` yields inputs or ``(inputs, targets)`` batches.
    """
    start = time.perf_counter()
    log = log if log is not None else MatchLog()
    points = _capture_points(model_a, space)
    data = list(data)
    fa = _activations(model_a, points, data, max_samples, seed)
    fb = _activations(model_b, points, data, max_samples, seed)
    specs, feats_a, feats_b = [], {}, {}
    for m, f in fa.items():
        pname, _ = points[m]
        t = space.tensors[pname]
        out_axis = t.axes[t.out_axis]
        if f.shape[0] != out_axis.size or m not in fb:
            continue
        key = f"act:{m}"
        specs.append(TensorSpec(key, tuple(f.shape), (out_axis, Axis.fixed(f.shape[1]))))
        feats_a[key], feats_b[key] = f, fb[m]
    act_space = WeightSpace(dict(space.groups), {s.name: s for s in specs})
    covered = {space.groups[lab].within or lab for s in specs for lab in s.groups}
    g = weight_matching(
        act_space,
        feats_a,
        feats_b,
        tensors=list(feats_a),
        seed=seed,
        max_sweeps=1 if covered else 0,
        log=log,
    )
    rest = [n for n, grp in space.groups.items() if grp.within is None and n not in covered]
    if rest:
        log.notes.append(f"{len(rest)} groups weight-matched (no activation reaches them)")
        # the rest are built from the activation-matched groups they touch (construction)
        g = weight_matching(
            space,
            model_a.state_dict(),
            model_b.state_dict(),
            init=g,
            groups=rest,
            seed=seed,
            construct=True,
        )
    log.seconds = time.perf_counter() - start
    return g


# --------------------------------------------------------------------------- STE
def ste_matching(
    model: nn.Module,
    space: WeightSpace,
    weights_a: Mapping[str, Tensor],
    weights_b: Mapping[str, Tensor],
    data: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    seed: int = 0,
    init: Mapping[str, Tensor] | str | None = None,
    progress: bool = False,
    log: MatchLog | None = None,
) -> Element:
    """The straight-through estimator of Git Re-Basin.

    Learns proxy weights ``w~`` (initialized at a): each step weight-matches b to ``w~``
    and evaluates the midpoint ``(a + π(b)) / 2`` on a batch, with the projection's
    gradient passed straight through to ``w~``. Returns the permutation of the last
    projection. ``model`` is any module of the architecture (its own weights unused);
    ``data`` yields ``(inputs, targets)``.

    Args:
        init: where the first projection's weight matching starts: ``None`` (identity,
            the paper's choice), an element, or ``"activation"``: the element of
            :func:`activation_matching` on ``data`` (``model`` loaded with a and with b).
            On transformers, whose weights alone say little about which units match,
            ``init="activation"`` with ``lr=1e-2`` and ~10 epochs is what brings the
            barrier down (``benchmarks/results/align.md``, ViT-tiny).
    """
    from torch.func import functional_call

    start = time.perf_counter()
    log = log if log is not None else MatchLog()
    names = matchable(space, weights_a)
    proxy = {n: weights_a[n].detach().clone().requires_grad_() for n in names}
    opt = torch.optim.Adam(list(proxy.values()), lr=lr)
    module = copy.deepcopy(model).train()
    batches = list(data)
    if isinstance(init, str):
        if init != "activation":
            raise ValueError(f"init={init!r}: expected None, an element or 'activation'")
        pair = []
        for w in (weights_a, weights_b):
            m = copy.deepcopy(model)
            m.load_state_dict(dict(w), strict=False)
            pair.append(m)
        init = activation_matching(*pair, space, batches, seed=seed)
        log.notes.append("started from activation matching")
    g = weight_matching(space, weights_a, weights_b, seed=seed, init=init)
    for _ in _progress(range(epochs), progress, desc="STE", unit="epoch"):
        for x, y in batches:
            current = {n: p.detach() for n, p in proxy.items()}
            g = weight_matching(space, current, weights_b, init=g, seed=seed, tensors=names)
            projected = space.apply(weights_b, g)
            # buffers are cloned: train-mode batch norm updates them in place
            mid = {k: v.clone() for k, v in weights_a.items()}
            for n in names:
                straight = proxy[n] + (projected[n] - proxy[n]).detach()
                mid[n] = 0.5 * (weights_a[n] + straight)
            loss = loss_fn(functional_call(module, mid, (x,), tie_weights=False), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.objective.append(float(loss.detach()))
    current = {n: p.detach() for n, p in proxy.items()}
    g = weight_matching(space, current, weights_b, init=g, seed=seed, tensors=names)
    log.seconds = time.perf_counter() - start
    return g


# --------------------------------------------------------------------------- safety
@torch.no_grad()
def verify_aligned(
    model: nn.Module,
    original: Mapping[str, Tensor],
    aligned: Mapping[str, Tensor],
    inputs: Tensor | tuple,
    rtol: float = FUNCTION_TOL[torch.float64],
) -> float:
    """Check that ``aligned`` computes the same function as ``original`` on ``inputs``.

    Both run in float64 (copies; the model is untouched), so a correct permutation agrees
    to rounding (~1e-15) and a wrong one is far off. Returns the worst relative error;
    raises :class:`AlignmentError` naming the output at fault if it exceeds ``rtol``.
    """
    from torch.func import functional_call

    module = copy.deepcopy(model).double().eval()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)

    def run(weights):
        w = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
        out = functional_call(module, w, inputs, tie_weights=False, strict=False)
        leaves = out if isinstance(out, (tuple, list)) else [out]
        if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
            leaves = list(out.to_tuple())
        return [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]

    ref, got = run(original), run(aligned)
    worst = 0.0
    for i, (r, o) in enumerate(zip(ref, got)):
        scale = float(r.abs().max()) or 1.0
        err = float((r - o).abs().max()) / scale
        worst = max(worst, err)
        if not err <= rtol:
            raise AlignmentError(
                f"aligned weights change output {i} of {type(model).__name__} "
                f"(relative error {err:.2e} > {rtol:.0e}); refusing to use them"
            )
    return worst
