"""mergekit's core merge methods, one tensor at a time.

``merge_tensor(method, name, tensors, base, params=..., model_params=...)`` merges the values
of a single tensor, so a streaming merge can load, merge and write one tensor at a time.
``merge_state_dicts`` is the same over whole state dicts.

Semantics follow mergekit (arcee-ai/mergekit 0.1.5; our own implementation):

* ``linear``: ``sum w_i x_i``, divided by ``sum w_i`` when ``normalize`` (default true). No base.
* ``slerp``: base plus exactly one other model, parameter ``t`` (required); vectors are
  normalised (if their norm exceeds 1e-8), ``|cos| > 0.9995`` falls back to lerp,
  ``t = 0`` gives the base.
* generalized task arithmetic (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``): deltas ``x_i - base``
  are sparsified per model (magnitude top-k with ``k = max(1, int(density * numel))`` / random keep
  with probability ``density`` / "magnitude outliers": drop the ``int(gamma * numel)``
  largest, keep ``int(density * numel)``, drop the rest / DELLA's rank-dependent keep
  probabilities ``density +- epsilon`` per row); ``rescale`` (default true for DARE and
  DELLA) rescales a sparsified delta to its original L1 norm, as mergekit does; then
  ``w_i * delta_i`` are summed, keeping only entries whose sign agrees with the sign of the
  weighted sum (TIES consensus "sum") for the ``*ties``/``della`` methods. ``normalize``
  (default true for ties and della) divides by the sum of the weights where the mask
  agrees (by ``sum w_i`` without consensus; a zero divisor becomes 1); ``lambda``
  (default 1) scales the merged delta. Per-model ``weight`` and ``density`` (default 1);
  ``gamma`` (default 0.01) for breadcrumbs, ``epsilon`` (default 0.15) for della.
* ``model_stock``: ``t = k cos / (1 + (k - 1) cos)`` with ``cos`` the mean pairwise cosine of
  the task vectors (norm product clamped at 1e-6), result ``t * mean(x_i) + (1 - t) base``;
  ``t = 0`` (the base) where ``|1 + (k - 1) cos| < 1e-6``;
  the whole tensor is flattened (1-D tensors included) unless ``filter_wise``, where each
  row gets its own ``t`` and 1-D tensors count as one row.

As in mergekit, a per-model parameter missing from a model's parameters is looked up in the
global parameters. Differences (deliberate): ``weight`` defaults to 1 instead of being
required; ``rescale`` also accepts ``"l1"``, ``"l2"``, ``"linf"`` (norm matched after
masking) and ``"density"`` (divide each kept entry by its keep probability, the DARE/DELLA
papers' unbiased rescaling); DELLA ranks each row of
``tensor.reshape(shape[0], -1)`` (mergekit ranks along dim 1 of the raw tensor); density 0
gives a zero delta (mergekit asserts); mismatched shapes raise instead of being skipped or
cut to the base's embedding size. Random masks come from a CPU ``torch.Generator`` seeded
from ``(seed, zlib.crc32(name))``, so they do not depend on tensor order or device (and do
not reproduce mergekit's, which uses the global RNG).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

__all__ = [
    "MergeMethod",
    "METHODS",
    "check_parameter",
    "resolve_parameters",
    "merge_tensor",
    "merge_state_dicts",
]

_REQUIRED = None  # default value marking a required parameter


@dataclass(frozen=True)
class MergeMethod:
    name: str
    needs_base: bool
    params: Mapping[str, object]
    model_params: Mapping[str, object]
    # generalized task arithmetic only
    consensus: str | None = None  # "sum" (TIES) or None
    sparsify: str | None = None  # "magnitude" | "random" | "magnitude_outliers" | "della"
    optional_base: bool = False  # nuslerp, multislerp: a base is used when one is given
    n_models: int | None = None  # exactly this many non-base models (None: any, >= 1)

    def uses_base(self, given: bool) -> bool:
        """Whether a configured base is the base (else it is merged as one more model)."""
        return self.needs_base or (self.optional_base and given)


def _gta(name, consensus, sparsify, normalize, rescale) -> MergeMethod:
    model_params = {"weight": 1.0, "density": 1.0}
    if sparsify == "magnitude_outliers":
        model_params["gamma"] = 0.01
    if sparsify == "della":
        model_params["epsilon"] = 0.15
    return MergeMethod(
        name,
        True,
        MappingProxyType(
            {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False}
        ),
        MappingProxyType(model_params),
        consensus,
        sparsify,
    )


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(
        "linear", False, MappingProxyType({"normalize": True}), MappingProxyType({"weight": 1.0})
    ),
    "slerp": MergeMethod(
        "slerp", True, MappingProxyType({"t": _REQUIRED}), MappingProxyType({}), n_models=1
    ),
    "model_stock": MergeMethod(
        "model_stock", True, MappingProxyType({"filter_wise": False}), MappingProxyType({})
    ),
    "task_arithmetic": _gta("task_arithmetic", None, None, False, False),
    "ties": _gta("ties", "sum", "magnitude", True, False),
    "dare_ties": _gta("dare_ties", "sum", "random", False, True),
    "dare_linear": _gta("dare_linear", None, "random", False, True),
    "breadcrumbs": _gta("breadcrumbs", None, "magnitude_outliers", False, False),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", "sum", "magnitude_outliers", False, False),
    "della": _gta("della", "sum", "della", True, True),
    "della_linear": _gta("della_linear", None, "della", False, True),
    # one model's tensor, scaled (frankenmerges: slices of layers stacked as they are)
    "passthrough": MergeMethod(
        "passthrough", False, MappingProxyType({}), MappingProxyType({"scale": 1.0}), n_models=1
    ),
    "nuslerp": MergeMethod(
        "nuslerp",
        False,
        MappingProxyType({"nuslerp_flatten": True, "nuslerp_row_wise": False}),
        MappingProxyType({"weight": 1.0}),
        optional_base=True,
        n_models=2,
    ),
    "multislerp": MergeMethod(
        "multislerp",
        False,
        MappingProxyType({"normalize_weights": True, "eps": 1e-8}),
        MappingProxyType({"weight": 1.0}),
        optional_base=True,
    ),
    "karcher": MergeMethod(
        "karcher", False, MappingProxyType({"max_iter": 10, "tol": 1e-5}), MappingProxyType({})
    ),
    "sce": MergeMethod(
        "sce",
        True,
        MappingProxyType({"select_topk": 1.0, "int8_mask": False}),
        MappingProxyType({}),
    ),
    "nearswap": MergeMethod(
        "nearswap", True, MappingProxyType({"t": _REQUIRED}), MappingProxyType({}), n_models=1
    ),
    "arcee_fusion": MergeMethod(
        "arcee_fusion", True, MappingProxyType({}), MappingProxyType({}), n_models=1
    ),
    "ram": MergeMethod("ram", True, MappingProxyType({"epsilon": 1e-5}), MappingProxyType({})),
    "ramplus_tl": MergeMethod(
        "ramplus_tl",
        True,
        MappingProxyType({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
        MappingProxyType({}),
    ),
}

_RESCALE = {
    True: "l1",
    False: None,
    None: None,
    "l1": "l1",
    "l2": "l2",
    "linf": "linf",
    "density": "density",
}


_BOOLEAN = (
    "normalize",
    "int8_mask",
    "filter_wise",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "normalize_weights",
)
# number parameters: the closed/open range each must lie in (all must be finite)
_RANGES = {
    "weight": None,
    "scale": None,
    "t": None,
    "lambda": None,
    "density": ("(0, 1]", lambda v: 0 < v <= 1),
    "gamma": ("[0, 1]", lambda v: 0 <= v <= 1),
    "epsilon": ("[0, 1)", lambda v: 0 <= v < 1),
    "eps": ("[0, inf)", lambda v: v >= 0),
    "tol": ("[0, inf)", lambda v: v >= 0),
    "select_topk": ("[0, 1]", lambda v: 0 <= v <= 1),
    "r": None,
    "alpha": None,
    "max_iter": ("whole numbers >= 1", lambda v: v >= 1 and float(v).is_integer()),
}


def check_parameter(key: str, value):
    """``value`` checked for parameter ``key``: returned as the method reads it, or a
    ValueError naming the parameter, the value and what it takes.

    Numbers must be finite (NaN/inf would write an all-NaN model) and in range
    (``density`` in (0, 1], ``gamma`` in [0, 1], ``epsilon`` in [0, 1)); booleans must be
    booleans, not strings; ``rescale`` a boolean or one of ``l1, l2, linf, density``.
    """
    if key in _BOOLEAN:
        if not isinstance(value, bool):
            raise ValueError(f"parameter {key!r} must be true or false, got {value!r}")
        return value
    if key == "rescale":
        if isinstance(value, bool) or (isinstance(value, str) and value in _RESCALE):
            return value
        raise ValueError(
            f"parameter 'rescale' must be true, false, l1, l2, linf or density, got {value!r}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {key!r} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # a YAML integer of hundreds of digits
        raise ValueError(
            f"parameter {key!r} must be finite, got a {len(str(value))}-digit number"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"parameter {key!r} must be finite, got {value}")
    if _RANGES.get(key) is not None:
        text, ok = _RANGES[key]
        if not ok(value):
            raise ValueError(f"parameter {key!r} must lie in {text}, got {value:g}")
    return value


def _method(method: str) -> MergeMethod:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[method]


def resolve_parameters(m: MergeMethod, n: int, params, model_params):
    """``(global, per-model)`` parameters of method ``m`` for ``n`` models: defaults filled
    in, unknown names refused, every value checked (:func:`check_parameter`)."""
    params = dict(params or {})
    for key in params:
        if key not in m.params and key not in m.model_params:
            raise ValueError(f"unknown parameter {key!r} for merge method {m.name!r}")
    glob = {}
    for key, default in m.params.items():
        value = params.get(key, default)
        if value is _REQUIRED:
            raise ValueError(f"merge method {m.name!r} needs parameter {key!r}")
        glob[key] = check_parameter(key, value)
    if model_params is None:
        model_params = [{}] * n
    model_params = list(model_params)
    if len(model_params) != n:
        raise ValueError(f"{len(model_params)} model_params entries for {n} models")
    per_model = []
    for i, mp in enumerate(model_params):
        mp = dict(mp or {})
        for key in mp:
            if key not in m.model_params:
                raise ValueError(
                    f"unknown per-model parameter {key!r} (model {i}) for merge method {m.name!r}"
                )
        per_model.append(
            {
                key: check_parameter(key, mp.get(key, params.get(key, d)))
                for key, d in m.model_params.items()
            }
        )
    if m.name == "linear" and glob["normalize"]:
        if abs(sum(mp["weight"] for mp in per_model)) < 1e-12:
            raise ValueError(
                "the models' weights sum to zero: a normalized linear merge divides by "
                "their sum (set normalize: false, or change a weight)"
            )
    return glob, per_model


def _generator(seed: int, name: str) -> torch.Generator:
    # torch's CPU generator keeps only 32 bits of its seed: mix (seed, crc32(name)) into 32 bits
    h = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (1 << 64)
    g = torch.Generator()
    g.manual_seed((h ^ (h >> 32)) & 0xFFFFFFFF)
    return g


def _rescale(delta: Tensor, mask: Tensor, norm: str | None, eps: float = 1e-7) -> Tensor:
    masked = delta * mask
    if norm is None or norm == "density":
        return masked
    if norm == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = delta.norm(), masked.norm()
    else:  # linf
        before, after = delta.abs().max(), masked.abs().max()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _sparsify(kind: str, delta: Tensor, mp: dict, norm: str | None, g: torch.Generator) -> Tensor:
    density = mp["density"]
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    flat = delta.reshape(-1)
    if kind == "magnitude":
        mask = torch.zeros_like(flat)
        k = max(1, int(density * n))
        # mergekit's order (a descending argsort of |x| in float32): among equal
        # magnitudes, common in half types, the same entries are kept
        mask[torch.argsort(flat.abs().float(), descending=True)[:k]] = 1
        return _rescale(delta, mask.view_as(delta), norm)
    if kind == "magnitude_outliers":
        keep = int(density * n)
        n_top = min(int(mp["gamma"] * n), n - keep)
        n_bot = n - keep - n_top
        order = torch.argsort(flat.abs())
        mask = torch.zeros_like(flat)
        mask[order[n_bot : n - n_top]] = 1
        return _rescale(delta, mask.view_as(delta), norm)
    if kind == "random":
        mask = (torch.rand(delta.shape, generator=g, dtype=torch.float64) < density).to(
            delta.device, delta.dtype
        )
        out = _rescale(delta, mask, norm)
        return out / density if norm == "density" else out
    if kind == "della":
        eps = mp["epsilon"]
        if density + eps >= 1 or density - eps <= 0:
            raise ValueError(
                f"della: density +- epsilon must lie in (0, 1), got density={density}, epsilon={eps}"
            )
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
        ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(delta.dtype)  # 0 = smallest
        span = (
            ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values
        ).clamp(min=1)
        probs = (density - eps) + 2 * eps * (ranks / span).clamp(0, 1)
        draw = torch.rand(rows.shape, generator=g, dtype=torch.float64).to(
            delta.device, delta.dtype
        )
        mask = (draw < probs).to(delta.dtype)
        if norm == "density":
            return (rows * mask / probs).reshape(delta.shape)
        return _rescale(rows, mask, norm).reshape(delta.shape)
    raise AssertionError(kind)


def _gta_merge(m: MergeMethod, name, xs, base, glob, per_model, seed):
    norm = _RESCALE.get(glob["rescale"], "bad")
    if norm == "bad":
        raise ValueError(
            f"parameter 'rescale' must be true/false/l1/l2/linf/density, got {glob['rescale']!r}"
        )
    g = _generator(seed, name) if m.sparsify in ("random", "della") else None
    deltas = []
    for x, mp in zip(xs, per_model):
        d = x - base
        if m.sparsify is not None:
            d = _sparsify(m.sparsify, d, mp, norm, g)
        deltas.append(d)
    deltas = torch.stack(deltas)
    w = torch.tensor([mp["weight"] for mp in per_model], dtype=base.dtype, device=base.device)
    w = w.view(-1, *([1] * base.dim()))
    weighted = deltas * w
    if m.consensus == "sum":
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(base.dtype)
        mask = (weighted.sign() == majority).to(base.dtype)
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if glob["normalize"]:
        mixed = mixed / divisor
    if glob["lambda"] != 1:
        mixed = mixed * glob["lambda"]
    return base + mixed


def _slerp(
    t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> Tensor:
    """Spherical interpolation of the whole tensors, in mergekit's operation order: float32
    (float64 for float64 inputs), norms of 1M-element chunk norms, ``t`` as a tensor of
    that dtype, lerp where ``|cos| > dot_threshold``; returned in the inputs' dtype."""
    wide = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=wide, device=a.device)
    chunk = 1024 * 1024
    starts = range(0, a.shape[1], chunk)

    def norm(x):
        parts = [torch.linalg.vector_norm(x[:, s : s + chunk].to(wide), dim=1, keepdim=True)
                 for s in starts]  # fmt: skip
        n = torch.linalg.vector_norm(torch.stack(parts), dim=0)
        return torch.where(n > eps, n, 1)

    na, nb = norm(a), norm(b)
    dot = (
        torch.stack(
            [
                ((a[:, s : s + chunk].to(wide) / na) * (b[:, s : s + chunk].to(wide) / nb)).sum(
                    1, keepdim=True
                )
                for s in starts
            ]  # fmt: skip
        )
        .sum(0)
        .clamp(-1, 1)
    )
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin)
    out = torch.empty_like(a)
    for s in starts:
        out[:, s : s + chunk] = coef_a * a[:, s : s + chunk].to(wide) + coef_b * b[
            :, s : s + chunk
        ].to(wide)
    return out.reshape(v0.shape)


def _nuslerp(t: float, v0: Tensor, v1: Tensor, flatten: bool, row_wise: bool) -> Tensor:
    """Spherical interpolation of vectors: the whole tensor (``flatten``), its columns
    (``row_wise``, mergekit's naming) or its rows; exact colinearity falls back to lerp."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.arccos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if not flatten and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def _nuslerp_merge(xs, base, per_model, glob) -> Tensor:
    wa, wb = per_model[0]["weight"], per_model[1]["weight"]
    t = 0.5 if abs(wa + wb) < 1e-6 else wb / (wa + wb)
    flatten, row_wise = bool(glob["nuslerp_flatten"]), bool(glob["nuslerp_row_wise"])
    if base is None:
        return _nuslerp(t, xs[0], xs[1], flatten, row_wise)
    return base + _nuslerp(t, xs[0] - base, xs[1] - base, flatten, row_wise)


def _multislerp(xs, base, weights, glob, name: str) -> Tensor:
    """Spherical barycentre by projection onto the tangent plane at the weighted mean
    direction, rescaled by the weighted mean norm (mergekit's multislerp, its op order)."""
    if len(xs) == 1:
        return xs[0]
    eps = float(glob["eps"])
    stacked = torch.stack(xs)
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(len(xs), -1)
    w = torch.tensor(weights, dtype=flat.dtype, device=flat.device)
    if glob["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(xs) == 2:
            out = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(xs[0].shape)
            return out + base if base is not None else out
        raise ValueError(f"multislerp of {name!r}: the weighted mean direction is zero")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tau = (tangent * w.view(-1, 1)).sum(0)
    length = torch.norm(tau) + eps
    res = mean * torch.cos(length) + tau * (torch.sin(length) / length)
    res = (res * (norms.squeeze(-1) * w).sum()).reshape(xs[0].shape)
    return res + base if base is not None else res


def _karcher(xs, max_iter: int, tol: float) -> Tensor:
    """The Karcher (Riemannian) mean of the inputs' directions on the unit sphere, scaled
    by their mean norm; norms in float32, the iteration in the inputs' dtype (mergekit)."""
    if len(xs) == 1:
        return xs[0]
    n = len(xs)
    alphas = [1.0 / n] * n
    wide = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in xs]
    units = [
        torch.zeros_like(x) if float(r) == 0 else (x / r).to(x.dtype) for x, r in zip(xs, norms)
    ]
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    m = torch.zeros_like(us[0])
    for ai, u in zip(a, us):
        m += ai * u
    m_norm = torch.linalg.vector_norm(m.to(wide))
    m = us[0].clone() if float(m_norm) < tol else (m / m_norm).to(m.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(m)
        for ai, u in zip(a, us):
            dot = torch.clamp(torch.dot(m.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * m)
        step = torch.linalg.vector_norm(tangent.to(wide))
        if float(step) < tol:
            break
        m = (torch.cos(step) * m + torch.sin(step) * (tangent / step)).to(m.dtype)
        unit = torch.linalg.vector_norm(m.to(wide))
        if float(unit) > tol:
            m = (m / unit).to(m.dtype)
    return sum(ai * r for ai, r in zip(alphas, norms)) * m


def _sce(xs, base, select_topk: float) -> Tensor:
    """Select (top-k variance entries), calculate (weights from mean squared deltas),
    erase (sign election), then the disjoint mean."""
    deltas = torch.stack([x - base for x in xs])
    if select_topk < 1:
        if select_topk <= 0:
            deltas = deltas * 0
        else:
            var = deltas.var(dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            mask = torch.zeros_like(var)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().reshape(-1), k).indices] = 1
            deltas = deltas * mask
    majority = torch.where(deltas.sum(0) >= 0, 1, -1).to(deltas.dtype)
    erase = (deltas.sign() == majority).to(deltas.dtype)
    weights = (deltas * deltas).reshape(len(xs), -1).mean(-1)
    total = weights.sum()
    if float(total.abs()) < 1e-6:
        weights = torch.full_like(weights, 1 / len(xs))
    else:
        weights = weights / total
    weights = weights.view(-1, *([1] * base.dim()))
    mixed = (weights * erase * deltas).sum(0) / (weights * erase).sum(0).clamp(min=1e-6)
    return base + mixed


def _nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """Take ``other`` where it lies within ``t`` of the base, move ``t / |a - b|`` of the
    way towards it elsewhere."""
    lam = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return lam * other + (1 - lam) * base


def _arcee_fusion(base: Tensor, other: Tensor, seed: int, name: str) -> Tensor:
    """Keep the changes whose importance (|delta| times the rows' KL divergence) exceeds
    the upper Tukey fence of the importances (median + 1.5 IQR)."""
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (other - base).abs() * kl
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:  # a sample of the importances, as mergekit (with replacement)
        idx = torch.randint(flat.numel(), (1_000_000,), generator=_generator(seed, name))
        flat = flat[idx.to(flat.device)]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[at]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def _ram(xs, base, glob, plus: bool) -> Tensor:
    """Reinforced agent merging: entries one model changed keep that change; entries
    several changed take their mean (RAM+ scales the unique ones by overlap, tensor-local)."""
    eps = float(glob["epsilon"])
    shape = base.shape
    tau = torch.stack([(x - base).reshape(-1) for x in xs])
    nz = tau.abs() > eps
    count = nz.sum(0)
    unique = count == 1
    overlap = count > 1
    z = tau * nz
    shared = z * overlap / count.clamp(min=1)
    if plus:
        # counts divided in float32, as mergekit: the scaled unique changes (and so the
        # result) come out in float32, cast to the merge dtype by the caller
        n_shared = (nz & overlap).sum(-1)
        n_unique = (nz & unique).sum(-1)
        rho = n_shared / n_unique.clamp(min=eps)
        lam = 1 + float(glob["r"]) * rho.clamp(0, float(glob["alpha"]))
        merged = (z * unique * lam[:, None] + shared).sum(0)
    else:
        merged = (z * unique + shared).sum(0)
    return base + merged.reshape(shape)


def _model_stock(xs, base, filter_wise: bool) -> Tensor:
    if len(xs) < 2:
        raise ValueError("model_stock needs a base and at least two other models")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in xs]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in xs]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            prod = offs[i].norm(dim=-1) * offs[j].norm(dim=-1)
            cos.append(((offs[i] * offs[j]).sum(-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * c
    singular = (
        den.abs() < 1e-6
    )  # no finite estimate (e.g. two opposite task vectors): keep the base
    t = torch.where(
        singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(den), den)
    )
    avg = sum(ws) / k
    return (t * avg + (1 - t) * w0).reshape(shape)


def merge_tensor(
    method: str,
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    params: Mapping | None = None,
    model_params: Sequence[Mapping] | None = None,
    seed: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Merge one tensor.

    ``tensors``: the non-base models' values of tensor ``name`` (already aligned); ``base``:
    the base model's value (None for methods that need none). With ``compute_dtype``
    (mergekit's ``dtype``, or the inputs' promoted dtype), computes in it as mergekit does
    (``linear`` and ``slerp`` in float32 inside) and returns it; by default computes in
    float32 (float64 if any input is float64) and returns the dtype of ``base`` (or
    ``tensors[0]``). Non-floating tensors come back unchanged. Random masks (DARE, DELLA)
    come from a generator seeded from ``(seed, zlib.crc32(name))``.
    """
    m = _method(method)
    tensors = list(tensors)
    if m.needs_base and base is None:
        raise ValueError(f"merge method {method!r} needs a base tensor for {name!r}")
    if not m.needs_base and not m.optional_base and base is not None:
        raise ValueError(f"merge method {method!r} takes no base (tensor {name!r})")
    if m.n_models is not None and len(tensors) != m.n_models:
        count = "exactly one model" if m.n_models == 1 else f"exactly {m.n_models} models"
        raise ValueError(
            f"merge method {method!r} merges {count}"
            + (" besides the base" if m.needs_base else "")
            + f", got {len(tensors)} for {name!r}"
        )
    if not tensors:
        if base is None:
            raise ValueError(f"no tensors to merge for {name!r}")
        return base
    ref = base if base is not None else tensors[0]
    for x in tensors:
        if tuple(x.shape) != tuple(ref.shape):
            raise ValueError(
                f"tensor {name!r}: shape mismatch {tuple(ref.shape)} vs {tuple(x.shape)}"
            )
    glob, per_model = resolve_parameters(m, len(tensors), params, model_params)
    if not ref.is_floating_point():
        return ref
    if ref.numel() == 0:  # nothing to merge (slerp's norms and top-k would fail on it)
        return ref if compute_dtype is None else ref.to(compute_dtype)
    everything = tensors + ([base] if base is not None else [])
    work = torch.float64 if any(x.dtype == torch.float64 for x in everything) else torch.float32
    if compute_dtype is not None and m.name not in ("linear", "slerp"):
        # mergekit: the other methods run in the load dtype itself (bf16 stays bf16)
        work = compute_dtype
    elif compute_dtype is not None:
        work = torch.float64 if compute_dtype == torch.float64 else torch.float32
    xs = [x.to(work) for x in tensors]
    b = base.to(work) if base is not None else None

    if m.name == "linear":
        w = torch.tensor([mp["weight"] for mp in per_model], dtype=work, device=xs[0].device)
        # mergekit's sum (zeros, then a fused multiply-add per model), one pass fewer: the
        # first product is the first multiply-add onto zeros, bit for bit
        out = torch.mul(xs[0], w[0])
        for wi, x in zip(w[1:], tensors[1:]):
            out.addcmul_(x.to(xs[0].device), wi)
        if glob["normalize"]:
            total = w.sum()
            if total.abs() < 1e-12:
                raise ValueError(f"linear merge of {name!r}: weights sum to zero, cannot normalize")
            out.div_(total)
    elif m.name == "slerp":
        if len(xs) != 1:
            raise ValueError(
                f"slerp merges the base with exactly one other model, got {len(xs)} for {name!r}"
            )
        out = _slerp(float(glob["t"]), b, xs[0])
    elif m.name == "model_stock":
        out = _model_stock(xs, b, bool(glob["filter_wise"]))
    elif m.name == "passthrough":
        scale = per_model[0]["scale"]
        out = xs[0] if scale == 1.0 else xs[0] * scale
    elif m.name == "nuslerp":
        out = _nuslerp_merge(xs, b, per_model, glob)
    elif m.name == "multislerp":
        out = _multislerp(xs, b, [mp["weight"] for mp in per_model], glob, name)
    elif m.name == "karcher":
        out = _karcher(xs, int(glob["max_iter"]), float(glob["tol"]))
    elif m.name == "sce":
        out = _sce(xs, b, float(glob["select_topk"]))
    elif m.name == "nearswap":
        out = _nearswap(b, xs[0], float(glob["t"]))
    elif m.name == "arcee_fusion":
        out = _arcee_fusion(b, xs[0], seed, name)
    elif m.name in ("ram", "ramplus_tl"):
        out = _ram(xs, b, glob, plus=m.name == "ramplus_tl")
    else:
        out = _gta_merge(m, name, xs, b, glob, per_model, seed)
    return out.to(compute_dtype or ref.dtype)


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None = None,
    *,
    params=None,
    model_params=None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """``merge_tensor`` for every tensor of the base (or first model).

    ``params`` / ``model_params`` may also be callables ``name -> value`` (e.g.
    ``MergeConfig.resolve``-derived), for per-tensor parameters.
    """
    models = list(models)
    ref = base if base is not None else (models[0] if models else None)
    if ref is None:
        raise ValueError("nothing to merge")
    out = {}
    for name in ref:
        for i, sd in enumerate(models):
            if name not in sd:
                raise ValueError(f"model {i} has no tensor {name!r}")
        p = params(name) if callable(params) else params
        mp = model_params(name) if callable(model_params) else model_params
        out[name] = merge_tensor(
            method,
            name,
            [sd[name] for sd in models],
            None if base is None else base[name],
            params=p,
            model_params=mp,
            seed=seed,
        )
    return out
