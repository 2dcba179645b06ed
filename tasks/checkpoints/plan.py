"""config → plan: every output tensor with its inputs, method and resolved parameters.

The plan is made from the config and the inputs' headers alone (no tensor is read).
Tensors are split, by name, into **layer tensors** (``<stack>.<i>.<rest>`` with ``<stack>``
one of ``layers``, ``h``, ``layer``, ``blocks``, ``block``: Llama/Mistral, GPT-2, BERT,
ViT-style names) and the others. As in mergekit:

* each slice maps its sources' layers ``[start, end)`` one to one onto the next output
  layers, renumbered from 0 across slices; layer ``k`` of a slice of ``n`` has gradient
  position ``t = k / (n - 1)`` (``1`` when ``n = 1``);
* tensors before the layers (embeddings: names with ``embed``, ``wte``, ``wpe``) come
  from the first slice's sources, the others (final norm, head) from the last slice's,
  both at ``t = 0``;
* a ``models:`` config is one slice over every layer of every model.

Parameters resolve per tensor: per model from the source's settings, then the slice's,
then the global ones; global parameters from the slice's, then the global ones. Filters
match the output tensor's name for global parameters and the input's for per-model ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metanet.io import CheckpointError
from tasks.checkpoints.checkpoint import Checkpoint
from tasks.checkpoints.config import MergeConfig, Slice, evaluate
from tasks.checkpoints.vocab import Vocab, is_embedding
from tasks.merge.methods import METHODS, resolve_parameters

__all__ = ["TensorPlan", "MergePlan", "plan_merge", "layer_of", "gradient_positions"]

_LAYER = re.compile(
    r"^(?P<stack>(?:.*\.)?(?:layers|h|layer|blocks|block))\.(?P<i>\d+)\.(?P<rest>.+)$"
)
_PRE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")


def layer_of(key: str) -> tuple[str, int, str] | None:
    """``(stack, index, rest)`` of a layer tensor's name, None for other tensors."""
    m = _LAYER.match(key)
    return (m["stack"], int(m["i"]), m["rest"]) if m else None


def gradient_positions(keys) -> dict[str, float]:
    """Gradient position ``t`` of every tensor of one model merged whole (a ``models:``
    config): layer ``i`` of a stack of ``n`` at ``i / (n - 1)`` (``1`` when ``n = 1``;
    each stack of an encoder-decoder on its own), the other tensors at 0."""
    found = {k: layer_of(k) for k in keys}
    sizes: dict[str, int] = {}
    for f in found.values():
        if f:
            sizes[f[0]] = max(sizes.get(f[0], 0), f[1] + 1)

    def t(f) -> float:
        if not f:
            return 0.0
        n = sizes[f[0]]
        return f[1] / (n - 1) if n > 1 else 1.0

    return {k: t(f) for k, f in found.items()}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: read ``inputs`` (``(source index, key)``), merge, write ``name``.

    ``base`` is the position in ``inputs`` of the base model's tensor (None when the
    method takes none); ``params`` the global parameters and ``model_params`` one dict
    per non-base input, resolved for this tensor; ``dtype`` the dtype it is written in.
    """

    name: str
    inputs: tuple[tuple[int, str], ...]
    base: int | None
    params: dict
    model_params: tuple[dict, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    compute_dtype: torch.dtype | None  # None: not floating, carried through unchanged
    vocab: bool = False  # an embedding, its rows reindexed into the output vocabulary


@dataclass
class MergePlan:
    method: str
    sources: list[Checkpoint]
    tensors: list[TensorPlan]
    layers: int | None  # output layer count (None: the inputs have no layer stack)
    reference: int  # the source whose folder (config, tokenizer) the output copies
    out_dtype: torch.dtype | None
    vocab: Vocab | None = None  # the output vocabulary, when the models' differ


def _settings(value_scopes: Sequence[dict], key: str, name: str, t: float):
    for scope in value_scopes:
        value = evaluate(name, scope.get(key), key, t)
        if value is not None:
            return value
    return None


def _layers(source: Checkpoint) -> tuple[str | None, int]:
    stacks = {}
    for key in source.keys:
        found = layer_of(key)
        if found:
            stacks.setdefault(found[0], set()).add(found[1])
    if not stacks:
        return None, 0
    if len(stacks) > 1:
        # several stacks (encoder-decoder): layer ranges would be ambiguous
        return None, -1
    ((stack, idx),) = stacks.items()
    return stack, max(idx) + 1


def plan_merge(
    config: MergeConfig, sources: dict[str, Checkpoint], vocab: Vocab | None = None
) -> MergePlan:
    """The plan for ``config`` over opened ``sources`` (reference as written -> Checkpoint);
    with ``vocab``, embeddings are written with one row per output token.

    Raises :class:`~metanet.io.CheckpointError` naming the model and tensor when the
    inputs do not fit the config (a missing tensor, a layer range past the end, shapes
    that differ)."""
    method = METHODS[config.method]
    order = list(sources)
    index = {ref: i for i, ref in enumerate(order)}
    compute = getattr(torch, config.dtype) if config.dtype else None
    out_dtype = getattr(torch, config.out_dtype) if config.out_dtype else None
    plans: list[TensorPlan] = []
    seen: set[str] = set()

    def add(name: str, slice_: Slice, inputs: list[tuple[int, str]], t: float) -> None:
        if name in seen:
            raise CheckpointError(f"the plan writes tensor {name!r} twice (overlapping slices?)")
        seen.add(name)
        srcs = [sources[order[i]] for i, _ in inputs]
        shapes = {srcs[j].shape(k) for j, (_, k) in enumerate(inputs)}
        embedding = vocab is not None and all(is_embedding(k, s) for s, (_, k) in zip(srcs, inputs))
        if embedding:  # rows become the output vocabulary's; widths must agree
            widths = {shape[1] for shape in shapes}
            if len(widths) != 1:
                raise CheckpointError(
                    f"tensor {name!r}: embedding widths differ ({sorted(widths)})"
                )
            shapes = {(vocab.size, widths.pop())}
        if len(shapes) != 1:
            desc = ", ".join(f"{s.ref}: {s.shape(k)}" for s, (_, k) in zip(srcs, inputs))
            raise CheckpointError(f"tensor {name!r} has different shapes ({desc})")
        base_ref = slice_.base or config.base
        base = None
        if method.uses_base(base_ref is not None):
            base = next(
                (
                    j
                    for j, s in enumerate(slice_.sources)
                    if base_ref is not None and s.model == base_ref
                ),
                None,
            )
            if base is None:
                raise CheckpointError(
                    f"tensor {name!r}: the base model {base_ref!r} is not among the inputs"
                )
        glob = {}
        for key in method.params:
            value = _settings((slice_.parameters, config.parameters), key, name, t)
            if value is not None:
                glob[key] = value
        per_model = []
        for j, src in enumerate(slice_.sources):
            if j == base:
                continue
            mp = {}
            for key in method.model_params:
                value = _settings(
                    (src.parameters, slice_.parameters, config.parameters), key, inputs[j][1], t
                )
                if value is not None:
                    mp[key] = value
            per_model.append(mp)
        n_models = len(inputs) - (base is not None)
        try:
            resolve_parameters(
                method, n_models, glob, per_model
            )  # every value checked, before any read
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r}: {e}") from None
        stored = [s.dtype(k) for s, (_, k) in zip(srcs, inputs)]
        work = None
        written = stored[base if base is not None else 0]
        if all(d.is_floating_point for d in stored):
            # mergekit: loaded in ``dtype`` (else as stored), computed in their promotion,
            # written in ``out_dtype`` (else the compute dtype)
            work = compute
            if work is None:
                work = stored[0]
                for d in stored[1:]:
                    work = torch.promote_types(work, d)
            written = out_dtype or work
        plans.append(
            TensorPlan(
                name,
                tuple(inputs),
                base,
                glob,
                tuple(per_model),
                next(iter(shapes)),
                written,
                work,
                embedding,
            )
        )

    first = sources[config.slices[0].sources[0].model]
    if not config.from_slices:
        # models: every tensor of the first model, by name, from every model; mergekit
        # leaves the layer count alone, and any architecture (several stacks) merges
        (slice_,) = config.slices
        positions = gradient_positions(first.keys)
        for key in first.keys:
            missing = [s.model for s in slice_.sources if key not in sources[s.model]]
            if missing and not first.dtype(key).is_floating_point:
                # a buffer (position ids, a counter) only some models' files carry: carried
                # through from those that have it, all equal (the executor checks)
                have = tuple(
                    (index[s.model], key) for s in slice_.sources if key in sources[s.model]
                )
                plans.append(
                    TensorPlan(key, have, None, {}, (), first.shape(key), first.dtype(key), None)
                )
                continue
            if missing:
                raise CheckpointError(f"{missing[0]}: has no tensor {key!r}")
            add(key, slice_, [(index[s.model], key) for s in slice_.sources], positions[key])
        reference = config.base if config.base is not None else slice_.sources[0].model
        return MergePlan(config.method, [sources[r] for r in order], plans, None,
                         index[reference], out_dtype or compute, vocab)  # fmt: skip
    stack, n_first = _layers(first)
    if n_first < 0:
        raise CheckpointError(
            f"{first.ref}: more than one stack of layers (an encoder-decoder?); layer "
            "slices cannot be mapped"
        )
    out_layers = 0
    for slice_ in config.slices:
        ranges = []
        for src in slice_.sources:
            s = sources[src.model]
            s_stack, n = _layers(s)
            if s_stack != stack:
                raise CheckpointError(
                    f"{src.model}: its layers are named {s_stack!r}, {first.ref}'s {stack!r} "
                    "(different architectures?)"
                )
            lo, hi = src.layer_range if src.layer_range is not None else (0, n)
            if hi > n:
                raise CheckpointError(
                    f"{src.model}: layer_range [{lo}, {hi}) but it has {n} layers"
                )
            ranges.append((lo, hi))
        if len({hi - lo for lo, hi in ranges}) != 1:
            desc = ", ".join(f"{s.model}: {hi - lo}" for s, (lo, hi) in zip(slice_.sources, ranges))
            raise CheckpointError(f"a slice's sources must have as many layers each ({desc})")
        count = ranges[0][1] - ranges[0][0]
        for k in range(count):
            t = k / (count - 1) if count > 1 else 1.0
            lead = sources[slice_.sources[0].model]
            prefix = f"{stack}.{ranges[0][0] + k}."
            for key in lead.keys:
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix) :]
                inputs = []
                for src, (lo, _) in zip(slice_.sources, ranges):
                    want = f"{stack}.{lo + k}.{rest}"
                    if want not in sources[src.model]:
                        raise CheckpointError(f"{src.model}: has no tensor {want!r}")
                    inputs.append((index[src.model], want))
                add(f"{stack}.{out_layers + k}.{rest}", slice_, inputs, t)
        out_layers += count

    # tensors outside the layers: embeddings from the first slice, the rest from the
    # last; written embeddings first, then the layers, then the rest (mergekit's order)
    layer_plans = plans[:]
    plans.clear()
    post = []
    for key in (k for k in first.keys if layer_of(k) is None):
        pre = any(p in key for p in _PRE)
        slice_ = config.slices[0] if pre else config.slices[-1]
        inputs = []
        for src in slice_.sources:
            if key not in sources[src.model]:
                raise CheckpointError(f"{src.model}: has no tensor {key!r}")
            inputs.append((index[src.model], key))
        add(key, slice_, inputs, 0.0)
        if not pre:
            post.append(plans.pop())
    plans.extend(layer_plans + post)
    reference = config.base if config.base is not None else config.slices[0].sources[0].model
    return MergePlan(
        config.method,
        [sources[r] for r in order],
        plans,
        out_layers if stack is not None else None,
        index[reference],
        out_dtype or compute,
        vocab,
    )
