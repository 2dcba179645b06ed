"""One checkpoint engine: config → plan → executor, in mergekit's shape.

* :mod:`~tasks.checkpoints.checkpoint`: the one :class:`Checkpoint` type: inputs read
  from their headers (files, folders, hub ids in the local Hugging Face cache), or held
  in memory (plain state dicts with ``--family`` or ``--model``); nothing is traced unless
  a job asks;
* :mod:`~tasks.checkpoints.config`: mergekit's YAML language (models or slices, scalar /
  gradient / filter parameters, dtype and out_dtype, tokenizer_source, chat_template),
  plus our ``align:`` stage per model; a config is also what CLI flags build;
* :mod:`~tasks.checkpoints.plan`: every output tensor with its inputs, method and
  parameters resolved, checked before any tensor is read;
* :mod:`~tasks.checkpoints.align_stage`: the only place a WeightSpace is built, when a
  model asks for ``align: weight|activation|ste``;
* :mod:`~tasks.checkpoints.executor`: lazy reads, one merge rule per method
  (:func:`tasks.merge.methods.merge_tensor`), a streaming writer into shards that checks
  every tensor finite, a drop-in Hugging Face folder.

:func:`merge_checkpoints` runs all of it (``metanet merge``), :func:`merge_weights` the
same on state dicts in memory, :func:`align_checkpoint`
writes one aligned checkpoint (``metanet align``), :func:`merge_many_checkpoints` runs
Git Re-Basin's MergeMany, and :func:`barrier_curves` the loss barrier (``metanet
barrier``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from metanet.io import CheckpointError
from metanet.space import WeightSpace
from tasks.checkpoints.align_stage import align_checkpoint, align_sources, match_pair
from tasks.checkpoints.checkpoint import (
    Checkpoint,
    check_compatible,
    load_checkpoint,
    open_checkpoint,
    resolve_model,
)
from tasks.checkpoints.config import MergeConfig, load_config, parse_config
from tasks.checkpoints.executor import execute, merged_tensors
from tasks.checkpoints.plan import MergePlan, TensorPlan, plan_merge

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "load_checkpoint",
    "resolve_model",
    "MergeConfig",
    "load_config",
    "parse_config",
    "MergePlan",
    "TensorPlan",
    "plan_merge",
    "execute",
    "align_sources",
    "align_checkpoint",
    "match_pair",
    "merge_checkpoints",
    "merge_weights",
    "merge_many_checkpoints",
    "barrier_curves",
]


def merge_checkpoints(
    config: MergeConfig,
    out: str | os.PathLike,
    *,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    data: list | None = None,
    seed: int = 0,
    device: str = "cpu",
    max_shard: int | None = None,
    max_sweeps: int = 100,
    low_memory: bool = False,
    ste_epochs: int = 10,
    ste_lr: float = 1e-2,
    progress: bool = False,
    quiet: bool = True,
) -> Path:
    """Open the config's models, plan, align where asked, merge into ``out``.

    ``checkpoints`` gives inputs already opened or held in memory (by the reference the
    config names them with); the others are opened lazily. ``data``: the batches that
    ``align: activation|ste`` run the model on.
    """
    given = dict(checkpoints or {})
    sources = {ref: given.get(ref) or open_checkpoint(ref) for ref in config.paths()}
    vocab = None
    if config.tokenizer is not None:
        from tasks.checkpoints.vocab import build_vocab

        vocab = build_vocab(config.tokenizer, sources, config.base)
        if vocab is not None and vocab.identity:
            vocab = None  # one vocabulary: the embeddings merge as they are
    plan = plan_merge(config, sources, vocab)
    readers = align_sources(
        config, plan, data=data, seed=seed, max_sweeps=max_sweeps, low_memory=low_memory,
        ste_epochs=ste_epochs, ste_lr=ste_lr, progress=progress, quiet=quiet, device=device,
    )  # fmt: skip
    return execute(plan, out, config=config, readers=readers, max_shard=max_shard, seed=seed,
                   device=device, progress=progress)  # fmt: skip


def merge_weights(
    config: MergeConfig | dict,
    weights: Mapping[str, Mapping[str, Tensor]],
    *,
    spaces: Mapping[str, WeightSpace] | None = None,
    seed: int = 0,
    device: str = "cpu",
    max_sweeps: int = 100,
) -> dict[str, Tensor]:
    """The engine on state dicts held in memory: the Python face of ``metanet merge``.

    ``config`` (a :class:`MergeConfig` or the mapping a YAML file holds) names its models;
    ``weights`` maps each name to its state dict. Models marked ``align: weight`` are
    matched onto the reference first, which needs the reference's WeightSpace in
    ``spaces``. Returns the merged state dict (on the CPU), the same tensors, bit for bit,
    that ``metanet merge`` writes for the same inputs.
    """
    from metanet.io import CheckpointError

    if not isinstance(config, MergeConfig):
        config = parse_config(config)
    sources = {}
    for ref in config.paths():
        if ref not in weights:
            raise CheckpointError(f"{ref}: the config merges it, and weights has no such model")
        space = (spaces or {}).get(ref)
        sources[ref] = Checkpoint(ref, Path("<in memory>") / ref, dict(weights[ref]), None, space)
    plan = plan_merge(config, sources)
    readers = align_sources(config, plan, seed=seed, max_sweeps=max_sweeps, device=device)
    return {
        t.name: merged.cpu()
        for t, merged in merged_tensors(plan, readers=readers, seed=seed, device=device)
    }


def _held(ck: Checkpoint) -> Checkpoint:
    """``ck`` in memory with its space: a lazy checkpoint's tensors read (a folder's
    under its model's names, the model built)."""
    if ck.lazy is None and ck.space is not None:
        return ck
    if ck.hf:
        return load_checkpoint(ck.path)
    opened = open_checkpoint(ck.path)
    if opened.space is None:
        raise CheckpointError(f"{ck.ref}: has no WeightSpace; pass --family or --model")
    return Checkpoint(ck.ref, ck.path, dict(opened.weights), None, opened.space)


def merge_many_checkpoints(
    refs: Sequence[str | Checkpoint],
    out: str | os.PathLike,
    *,
    seed: int = 0,
    max_rounds: int = 20,
    progress: bool = False,
) -> Path:
    """Git Re-Basin's MergeMany (:func:`tasks.merge.merge_many`): every model aligned to
    the mean of the others, the average written as the first model's checkpoint."""
    from tasks.merge import merge_many

    cks = [_held(r if isinstance(r, Checkpoint) else open_checkpoint(r)) for r in refs]
    ref = cks[0]
    for ck in cks[1:]:
        check_compatible(ref, ck)
    from tasks.checkpoints.stream import check_finite

    check_finite(cks)  # NaN/inf refused before any work, naming the tensor
    merged, _ = merge_many([ck.weights for ck in cks], ref.space, seed=seed,
                           max_rounds=max_rounds, progress=progress)  # fmt: skip
    if ref.hf:
        # back to the folder's own keys (a tied tensor once), then through the executor
        from metanet.shards import LazyWeights
        from tasks.checkpoints.checkpoint import _names_for

        files = LazyWeights(ref.path)
        names = _names_for(ref.model, set(files.entries))
        by_key = {key: merged[name] for name, key in reversed(list(names.items()))}
        # file tensors outside the model are carried from the first model
        merged = {key: by_key[key] if key in by_key else files.read(key) for key in files.entries}
    result = Checkpoint(ref.ref, ref.path, merged, ref.config, ref.space)
    config = parse_config({"merge_method": "passthrough", "models": [{"model": ref.ref}]})
    return merge_checkpoints(config, out, checkpoints={ref.ref: result}, seed=seed)


def _check_interpolable(a: Checkpoint, b: Checkpoint) -> None:
    """Refuse, naming the tensor, a checkpoint whose tensor is integer or bool where the
    model holds floating point: the path from A to B interpolates floating tensors only
    (others are taken from A), so the model could not even run on it."""
    model = a.model if a.model is not None else b.model
    if model is None:
        return
    state = model.state_dict()
    for ck in (a, b):
        for name, w in ck.weights.items():
            want = state.get(name)
            if want is not None and want.is_floating_point() and not w.is_floating_point():
                raise CheckpointError(
                    f"{ck.ref}: tensor {name!r} is {str(w.dtype).removeprefix('torch.')}, the "
                    f"model's is {str(want.dtype).removeprefix('torch.')}: a barrier "
                    "interpolates floating-point weights; save the checkpoint in floating point"
                )


def barrier_curves(
    a: Checkpoint,
    b: Checkpoint,
    evaluate: Callable,
    *,
    alphas: int = 11,
    align: str | None = "weight",
    data: list | None = None,
    seed: int = 0,
    max_sweeps: int = 100,
    ste_epochs: int = 10,
    ste_lr: float = 1e-2,
    progress: bool = False,
    quiet: bool = True,
) -> dict:
    """Loss (and accuracy) along the straight line from ``a`` to ``b`` (``naive``), and,
    with ``align``, to ``b`` permuted onto ``a`` (``aligned``; checked a relabelling with
    the same function first): :class:`tasks.merge.Barrier` per curve."""
    import sys

    from tasks.checkpoints.align_stage import _check_function, moved_groups, symmetry
    from tasks.checkpoints.stream import require_finite
    from tasks.merge import loss_barrier

    a, b = _held(a), _held(b)
    check_compatible(a, b)
    _check_interpolable(a, b)
    for ck in (a, b):  # a NaN would give a NaN curve, and matching an unsolvable cost
        for name, w in ck.weights.items():
            require_finite(ck.ref, name, w, then="no barrier can be measured")
    curves = {"naive": loss_barrier(evaluate, a.weights, b.weights, alphas=alphas)}
    if align is not None:
        g, summary = match_pair(a, b, align, data=data, seed=seed, max_sweeps=max_sweeps,
                                ste_epochs=ste_epochs, ste_lr=ste_lr, progress=progress)  # fmt: skip
        err = _check_function(a, b, g)
        if not quiet:
            moved, total = moved_groups(a.space, g)
            checked = "" if err is None else f"; same function (max rel. error {err:.1e})"
            print(f"aligned {b.ref} to {a.ref}: {moved}/{total} groups permuted, "
                  f"{summary}{checked}", file=sys.stderr)  # fmt: skip
        aligned = symmetry(a.space).apply(b.weights, g)
        curves["aligned"] = loss_barrier(evaluate, a.weights, aligned, alphas=alphas)
    return curves
