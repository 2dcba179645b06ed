"""Generic symmetry checks: any function, any network, any WeightSpace.

``assert_function_preserved`` is the converter's test: a random group element applied to
a network's real weights must leave its outputs unchanged. ``assert_equivariant`` is the
metanetwork's test: permuting the input weights permutes the output (or leaves an
invariant output unchanged).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from metanet.space import WeightSpace

__all__ = ["assert_function_preserved", "assert_equivariant", "max_error"]


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
