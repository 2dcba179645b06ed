"""Generic symmetry checks: any function, any network, any WeightSpace.

``assert_function_preserved`` is the converter's test: a random group element applied to
a network's real weights must leave its outputs unchanged. ``assert_equivariant`` is the
metanetwork's test: permuting the input weights permutes the output (or leaves an
invariant output unchanged). ``symmetry_certificate`` holds the *continuous* symmetry a
WeightSpace claims against the network's numerical functional dimension.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from metanet.space import WeightSpace

__all__ = [
    "assert_function_preserved",
    "assert_equivariant",
    "max_error",
    "claimed_continuous_dims",
    "symmetry_certificate",
    "SymmetryCertificate",
]


def _to(obj: Any, dtype: torch.dtype) -> Any:
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, obj
    )


def max_error(a: Any, b: Any, relative: bool = False) -> float:
    """Largest absolute (or max-normalised relative) difference between two pytrees."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise AssertionError(f"outputs have different keys: {sorted(set(a) ^ set(b))}")
        return max((max_error(a[k], b[k], relative) for k in a), default=0.0)
    la, _ = tree_flatten(a)
    lb, _ = tree_flatten(b)
    if len(la) != len(lb):
        raise AssertionError(f"outputs have {len(la)} and {len(lb)} leaves")
    worst = 0.0
    for x, y in zip(la, lb):
        if not isinstance(x, Tensor):
            continue
        if x.shape != y.shape:
            raise AssertionError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        err = (x.double() - y.double()).abs().max().item()
        if relative:
            err /= max(x.double().abs().max().item(), 1e-300)
        worst = max(worst, err)
    return worst


def assert_function_preserved(
    model: nn.Module,
    space: WeightSpace,
    inputs: tuple | Tensor,
    n: int = 5,
    atol: float = 1e-10,
    rtol: float | None = None,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    weights: Mapping[str, Tensor] | None = None,
) -> float:
    """Check that ``n`` random group elements leave the model's outputs unchanged.

    The model and inputs are copied to ``dtype`` (float64 by default); the model is put in
    eval mode. With ``rtol`` the error is relative to the largest output magnitude,
    otherwise absolute against ``atol``. Returns the worst error seen.

    Raises:
        AssertionError: naming the element index and the error, if any output changed.
    """
    model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype)
        inputs = _to(inputs, dtype)
    model.eval()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    state = dict(weights) if weights is not None else dict(model.state_dict())
    # tied tensors (one parameter under two names) are passed to the model once
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tied: set[str] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)

    def run(sd: Mapping[str, Tensor]) -> Any:
        return functional_call(model, {k: v for k, v in sd.items() if k not in tied}, args)

    if dtype is not None:
        state = _to(state, dtype)
    space.validate(state, strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = run(state)
        worst = 0.0
        for i in range(n):
            g = space.random_element(generator=gen)
            out = run(space.apply(state, g))
            err = max_error(ref, out, relative=rtol is not None)
            worst = max(worst, err)
            tol = rtol if rtol is not None else atol
            if not err <= tol:
                kind = "relative" if rtol is not None else "absolute"
                raise AssertionError(
                    f"group element {i} changed the model's outputs: max {kind} error "
                    f"{err:.3e} > {tol:.1e}; the space claims a symmetry the network lacks"
                )
    return worst


def assert_equivariant(
    fn: Callable[[dict[str, Tensor]], Any],
    space: WeightSpace,
    features: Mapping[str, Tensor],
    n: int = 5,
    atol: float = 1e-8,
    seed: int = 0,
    output_space: WeightSpace | None = None,
) -> float:
    """Check ``fn(g·w) == g·fn(w)`` (dict outputs) or ``fn(g·w) == fn(w)`` (others).

    ``features`` is a weight-feature dict ``{name: Tensor(..., *shape)}`` (leading batch
    and channel axes allowed). A Mapping output is treated as equivariant and permuted
    with ``output_space`` (default: ``space``); any other output must be invariant.
    Returns the worst absolute error.
    """
    out_space = output_space or space
    gen = torch.Generator().manual_seed(seed)
    ref = fn(dict(features))
    worst = 0.0
    for i in range(n):
        g = space.random_element(generator=gen)
        got = fn(space.apply(features, g))
        want = out_space.apply(ref, g) if isinstance(ref, Mapping) else ref
        err = max_error(want, got)
        worst = max(worst, err)
        if not err <= atol:
            what = "equivariant" if isinstance(ref, Mapping) else "invariant"
            raise AssertionError(
                f"function is not {what}: group element {i} gives max error {err:.3e} > {atol:.1e}"
            )
    return worst


# --------------------------------------------------------------------------- certificate


def _positive_scale_neurons(space: WeightSpace) -> tuple[int, set[str]]:
    """Positive scales the neuron sets carry: one per neuron of every axis segment whose
    groups all scale positively (an outer group of an indexed one may not), each distinct
    segment once, and the positive-scale groups that were counted that way.

    A segment is identified by the multiset of its non-fixed factors, so the residual
    stream's sets (one neuron set per add, the same neurons) count once, and a channel
    shuffle's transposed view ``(b × a)`` of ``(a × b)`` is the same neurons. Fixed
    factors (a flattened ``channels × (h·w)``) add no scales: the scale is the channel's.
    """
    seen: dict[tuple, int] = {}
    covered: set[str] = set()
    for ns in space.neuron_sets.values():
        for seg in ns.axis.segments:
            facs = [f for f in seg if f.group is not None]
            names = {f.group for f in facs}
            pos = {g for g in names if space.groups[g].action == "positive_scale"}
            if not pos:
                continue
            outers = {space.groups[g].within for g in pos}
            if any(g not in pos and g not in outers for g in names):
                continue
            key = tuple(sorted((f.group, f.size) for f in facs))
            seen[key] = math.prod(f.size for f in facs)
            covered |= pos
    return sum(seen.values()), covered


def claimed_continuous_dims(space: WeightSpace) -> dict[str, int]:
    """The dimension of the continuous symmetry the space claims, by kind.

    ``positive_scale``: one scale per *neuron* (hidden unit) of the neuron sets whose
    axis segments carry positive-scale groups: on a product axis (``heads × head_dim``,
    a ShuffleNet stream ``g × c/g``) that is the product of the factor sizes, not the
    number of permuted points; the same neurons seen by several sets (residual stream,
    channel shuffle) count once (:func:`_positive_scale_neurons`). A positive-scale group
    on no neuron set (a hand-built space) counts its permuted points (``size``, times the
    outer size for an indexed group). ``gl``: ``size²`` per copy; ``norm_scale``: one per
    factor of each :class:`~metanet.space.NormScale` with a parameter among its members.
    Sign flips and permutations are discrete and add nothing.
    """
    out = {"positive_scale": 0, "gl": 0, "norm_scale": 0}
    neurons, covered = _positive_scale_neurons(space)
    out["positive_scale"] = neurons
    for g in space.groups.values():
        copies = space.groups[g.within].size if g.within else 1
        if g.action == "positive_scale" and g.name not in covered:
            out["positive_scale"] += copies * g.size
        elif g.action == "gl":
            out["gl"] += copies * g.size * g.size
    params = {t.name for t in space.tensors.values() if t.kind == "parameter"}
    for ns in space.norm_scales:
        if any(m[0] in params and m[2] == 1 for m in ns.members):
            out["norm_scale"] += ns.size
    return out


@dataclass
class SymmetryCertificate:
    """The continuous symmetry a WeightSpace claims, held against the Jacobian's rank.

    ``params`` (P) values in θ; the Jacobian of ``θ ↦ (f_θ(x_1), …, f_θ(x_N))`` has
    ``rows`` rows and numerical ``rank``; ``deficiency = P − rank`` is the dimension of the
    directions that change no output (Grigsby, Lindsey & Rolnick: the functional
    dimension is ``rank``). ``claimed`` is :func:`claimed_continuous_dims` summed.
    ``verdict``: ``complete`` (claimed == deficiency), ``N hidden directions`` (the space
    misses N), ``claims too much`` (more than the network has, or a claimed direction that
    moves the outputs: impossible if the claim is sound), or ``not saturated`` (the rank
    still grew with the last sixth of the rows: give more inputs).
    """

    params: int
    rows: int
    rank: int
    rank_at_5_6: int
    deficiency: int
    claimed: int
    claimed_by_kind: dict[str, int]
    rtol: float
    smallest_kept: float
    largest_dropped: float
    verdict: str
    off_kernel: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.claimed_by_kind.items() if v)
        return (
            f"{self.verdict}: {self.params} params, rank {self.rank} of {self.rows} rows "
            f"(deficiency {self.deficiency}); claimed {self.claimed} ({kinds or 'none'}); "
            f"singular values / max: kept >= {self.smallest_kept:.1e}, dropped <= "
            f"{self.largest_dropped:.1e} (rtol {self.rtol:.0e})"
        )


def _certificate_copy(model: nn.Module) -> nn.Module:
    """float64, eval mode, norms at eps = the smallest positive float64 (the invariances
    they give are exact at eps = 0; BatchNorm refuses 0 on batch statistics), BatchNorm on
    batch statistics: the training-time function, whose parameters are the weights;
    running statistics are not parameters of it."""
    model = copy.deepcopy(model).double().eval()
    for m in model.modules():
        if isinstance(getattr(m, "eps", None), float):
            m.eps = torch.finfo(torch.float64).tiny
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = None
            m.running_var = None
            m.track_running_stats = False
    return model


def symmetry_certificate(
    model: nn.Module,
    space: WeightSpace,
    inputs: Callable[[int], tuple | Tensor] | tuple | Tensor,
    *,
    rtol: float = 1e-10,
    chunk: int = 4,
    max_params: int = 8000,
    oversample: float = 2.0,
    max_rows: int = 40000,
) -> SymmetryCertificate:
    """Numerical functional dimension vs the continuous symmetry ``space`` claims.

    θ is every floating parameter of ``model`` (P values). The Jacobian
    ``J = ∂ vec(f_θ(x_1..x_N)) / ∂θ`` is built in float64 by reverse mode, ``chunk``
    inputs at a time (each chunk is one forward pass: BatchNorm normalizes over it), with
    ``N`` inputs such that ``rows >= oversample · P``. Its rank is the number of singular
    values above ``rtol · σ_max`` (SVD); the rank of the first 5/6 of the rows must equal
    it (saturation), else the rows are doubled (fresh inputs) up to ``max_rows``. The
    model is copied with every norm's ``eps`` set to ~0 and BatchNorm on batch statistics
    (see :func:`_certificate_copy`); dropout is off.

    ``inputs``: a callable ``n -> inputs`` (a tensor or tuple with a leading batch axis;
    rarely active ReLU units need inputs of several scales to be seen), or fixed inputs
    with enough rows (no doubling). Claimed norm-scale directions are checked to lie in
    the kernel (``|J t| <= 1e-6 σ_max |t|``); one that does not is named in
    ``off_kernel`` and makes the verdict ``claims too much``.

    Raises:
        ValueError: P above ``max_params`` (J is ``rows × P`` float64 and its SVD costs
            ``O(rows · P²)``: 8,000 parameters take ~10^4 × 8·10^3 × 8 B = 0.6 GB and a
            few minutes on two cores), or fixed inputs that give too few rows.
    """
    from torch.func import jacrev

    net = _certificate_copy(model)
    names = [n for n, p in net.named_parameters() if p.is_floating_point()]
    values = [p.detach() for n, p in net.named_parameters() if p.is_floating_point()]
    sizes = [v.numel() for v in values]
    n_params = sum(sizes)
    if n_params > max_params:
        raise ValueError(
            f"symmetry_certificate: {type(model).__name__} has {n_params:,} parameters, above "
            f"max_params={max_params:,} (the Jacobian needs >= {n_params:,} rows and an SVD "
            "of O(rows · P²)); certify a narrower instance or raise max_params"
        )
    theta = torch.cat([v.reshape(-1) for v in values])
    buffers = {k: v for k, v in net.named_buffers()}

    def unflatten(t: Tensor) -> dict[str, Tensor]:
        return {n: c.view_as(v) for n, c, v in zip(names, t.split(sizes), values)}

    def outputs(t: Tensor, args: tuple) -> Tensor:
        out = functional_call(net, {**buffers, **unflatten(t)}, args)
        leaves = [x for x in tree_flatten(out)[0] if isinstance(x, Tensor)]
        return torch.cat([x.reshape(-1) for x in leaves if x.is_floating_point()])

    def as_args(x: Any) -> tuple:
        return _to(x if isinstance(x, tuple) else (x,), torch.float64)

    jac = jacrev(outputs)

    def jacobian(pool: tuple) -> Tensor:
        total = pool[0].shape[0]
        blocks = []
        for i in range(0, total, chunk):
            args = tuple(a[i : i + chunk] for a in pool)
            if args[0].shape[0] < 2:  # BatchNorm needs two samples; drop a last single one
                break
            blocks.append(jac(theta, args).detach())
        return torch.cat(blocks)

    probe = as_args(inputs(chunk) if callable(inputs) else inputs)
    per_input = outputs(theta, tuple(a[:2] for a in probe)).numel() // 2
    factor = oversample
    while True:
        need = math.ceil(factor * n_params / per_input) + chunk
        if callable(inputs):
            pool = as_args(inputs(need))
        else:
            pool = probe
            if pool[0].shape[0] * per_input < factor * n_params:
                raise ValueError(
                    f"symmetry_certificate: {pool[0].shape[0]} inputs give "
                    f"{pool[0].shape[0] * per_input} rows for {n_params} parameters; pass "
                    f">= {need} inputs or a callable n -> inputs"
                )
        jm = jacobian(pool)
        sv = torch.linalg.svdvals(jm)
        top = float(sv[0]) if sv.numel() else 0.0
        rank = int((sv > rtol * top).sum())
        sv_part = torch.linalg.svdvals(jm[: (5 * jm.shape[0]) // 6])
        rank_part = int((sv_part > rtol * top).sum())
        if rank_part == rank or not callable(inputs) or 2 * jm.shape[0] > max_rows:
            break
        factor *= 2  # the rank still grew: twice the rows
    kept = float(sv[rank - 1]) / top if rank else 0.0
    dropped = float(sv[rank]) / top if rank < sv.numel() else 0.0
    deficiency = n_params - rank
    by_kind = claimed_continuous_dims(space)
    claimed = sum(by_kind.values())
    off = _off_kernel(space, jm, theta, names, sizes, top)
    if rank_part != rank:
        verdict = "not saturated"
    elif off or claimed > deficiency:
        verdict = "claims too much"
    elif claimed == deficiency:
        verdict = "complete"
    else:
        verdict = f"{deficiency - claimed} hidden directions"
    return SymmetryCertificate(
        n_params,
        jm.shape[0],
        rank,
        rank_part,
        deficiency,
        claimed,
        by_kind,
        rtol,
        kept,
        dropped,
        verdict,
        off,
    )


def _off_kernel(
    space: WeightSpace,
    jm: Tensor,
    theta: Tensor,
    names: list[str],
    sizes: list[int],
    top: float,
) -> list[str]:
    """Norm scales whose tangent ``d/ds (s·members)`` at s = 1 moves the outputs."""
    offsets = dict(zip(names, torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()))
    bad = []
    for ns in space.norm_scales:
        members = [(t, a) for t, a, p in ns.members if p == 1 and t in offsets]
        if not members:
            continue
        tangents = torch.zeros(ns.size, theta.numel(), dtype=theta.dtype)
        for t, axis in members:
            shape = space.tensors[t].shape
            start = offsets[t]
            block = theta[start : start + math.prod(shape)].view(shape)
            if axis is None:
                tangents[0, start : start + block.numel()] = block.reshape(-1)
            else:
                rows = torch.arange(ns.size).reshape(
                    [-1 if i == axis else 1 for i in range(len(shape))]
                )
                onehot = torch.arange(ns.size)[:, None] == rows.expand(shape).reshape(1, -1)
                tangents[:, start : start + block.numel()] = onehot * block.reshape(1, -1)
        moved = (jm @ tangents.T).norm(dim=0)
        scale = top * tangents.norm(dim=1).clamp_min(1e-300)
        if bool((moved > 1e-6 * scale).any()):
            bad.append(ns.name)
    return bad
