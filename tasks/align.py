"""Git Re-Basin alignment for any :class:`~metanet.WeightSpace`.

``weight_matching(space, a, b)`` finds a group element ``g`` such that
``space.apply(b, g)`` is as close to ``a`` as the symmetry allows (maximizing
``sum_t <a_t, (g·b)_t>``), by coordinate descent over the space's groups with one linear
assignment per group (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023). Nothing is
written per architecture: every tensor is cut into *views*, one per choice of segment on
each axis, whose dimensions are the axis factors, each labelled with its group (or fixed).
A group's step sums, over all views it appears in, the inner products between a's slices
and b's slices along its dimension, with every other dimension of b already permuted by
the current element.

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
import itertools
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
        t = space.tensors[name]
        per_axis = []
        for axis in t.axes:
            choices, start = [], 0
            for seg in axis.segments:
                n = math.prod(f.size for f in seg)
                choices.append((slice(start, start + n), seg))
                start += n
            per_axis.append(choices)
        views = []
        for combo in itertools.product(*per_axis):
            shape, labels, axis_of, seg_of = [], [], [], []
            for i, (_, seg) in enumerate(combo):
                for j, f in enumerate(seg):
                    shape.append(f.size)
                    labels.append(f.group)
                    axis_of.append(i)
                    seg_of.append(j)
            if any(lab is not None for lab in labels) and math.prod(shape) > 0:
                views.append(
                    _View(
                        name,
                        tuple(s for s, _ in combo),
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

    def step(self, outer: str, g: dict[str, Tensor]) -> float:
        """Re-solve ``outer`` (and the groups within it); returns the objective gain."""
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
        for view in self.touching[outer]:
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

    def readers(self, todo: Iterable[str]) -> dict[str, list[str]]:
        """For each group of ``todo``, the groups of ``todo`` whose step reads its permutation.

        A step holds every other group in the views it reads at its current permutation,
        and its own where it occurs twice in a view (or carries more than one per-head
        dimension per occurrence): only then does its assignment problem change.
        """
        space = self.space
        todo = list(todo)

        def top(lab):
            return space.groups[lab].within or lab

        reads: dict[str, set[str]] = {}
        for x in todo:
            r, itself = set(), False
            for v in self.touching[x]:
                labels = [lab for lab in v.labels if lab is not None]
                r.update(top(lab) for lab in labels)
                occ = sum(lab == x for lab in labels)
                inner = sum(lab != x and top(lab) == x for lab in labels)
                itself = itself or occ > 1 or inner > occ
            reads[x] = r if itself else r - {x}
        return {y: [x for x in todo if y in reads[x]] for y in todo}

    def objective(self, g: Mapping[str, Tensor]) -> float:
        total = 0.0
        g = self._on_device(g)
        where = self.device or "cpu"
        for views in self.views.values():
            for v in views:
                bw = _permute_view(self.space, v, v.take(self.b[v.tensor].to(where)), g)
                bw = bw.reshape(-1)
                aw = v.take(self.a[v.tensor].to(where)).reshape(-1)
                # in float64 a chunk at a time: a whole embedding in float64 was the peak
                for i in range(0, aw.numel(), _CHUNK):
                    total += float(
                        torch.dot(aw[i : i + _CHUNK].double(), bw[i : i + _CHUNK].double())
                    )
        return total


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
) -> Element:
    """Permute ``b`` towards ``a``: returns ``g`` with ``space.apply(weights_b, g) ≈ a``.

    Coordinate descent: every sweep visits the groups (outer groups; per-head groups
    ride with their outer) in a random order and solves each as a linear assignment,
    holding the others; it stops after a sweep that does not improve the objective.

    Args:
        init: start element (default identity).
        groups: the outer groups to optimize (default all); the others keep ``init``.
        tensors: tensors whose inner products count (default :func:`matchable`).
        progress: a progress bar over sweeps.
        log: filled with the objective after each sweep and the time taken.
        device: where the similarity (cost) matrices are computed (default: the CPU, or
            the weights' device); each assignment is solved on the CPU (scipy). The
            element returned is on the CPU.
    """
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
    todo = [n for n, grp in space.groups.items() if grp.within is None]
    if groups is not None:
        wanted = set(groups)
        todo = [n for n in todo if n in wanted]
    todo = [
        n for n in todo if matcher.touching[n] and (space.groups[n].size > 1 or matcher.inners[n])
    ]
    rng = np.random.default_rng(seed)
    log = log if log is not None else MatchLog()
    log.groups = len(todo)
    base = matcher.objective(g) if todo else 0.0
    log.objective.append(base)
    # no total: a sweep limit is not an estimate of when matching ends (it stops when a
    # sweep no longer improves), so the bar shows sweeps done and their rate, no false ETA
    bar = _progress((i for i in range(max_sweeps)), progress, desc="weight matching", unit="sweep")
    # a group is re-solved only when a permutation its problem reads has changed since
    # its last solve; otherwise the same problem has the same answer (it would gain 0)
    readers = matcher.readers(todo)
    stale = set(todo)
    coupled = any(
        sum(lab is not None and (space.groups[lab].within or lab) == name for lab in v.labels) > 1
        for name in todo
        for v in matcher.touching[name]
    )
    best = {k: v.clone() for k, v in g.items()}
    for _ in bar:
        gain = 0.0
        for name in rng.permutation(todo):
            name = str(name)
            if name not in stale:
                continue
            stale.discard(name)
            step_gain = matcher.step(name, g)
            if step_gain > 0:
                stale.update(readers[name])
            gain += step_gain
        log.sweeps += 1
        if coupled:
            # a group on two axes of one tensor (a recurrent matrix) is solved with its
            # other occurrence held: the step gains are then not the objective's change,
            # so the sweep is judged on the true objective and undone if it lost
            value = matcher.objective(g)
            gain = value - log.objective[-1]
            if gain <= 0:
                g = best
                log.objective.append(log.objective[-1])
                break
            best = {k: v.clone() for k, v in g.items()}
            log.objective.append(value)
        else:
            log.objective.append(log.objective[-1] + gain)
        if progress:
            bar.set_postfix(objective=f"{log.objective[-1]:.4g}")
        if gain <= 1e-9 * max(1.0, abs(log.objective[-1])):
            break
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
        g = weight_matching(
            space, model_a.state_dict(), model_b.state_dict(), init=g, groups=rest, seed=seed
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
