"""The alignment stage: permute models onto a reference before they are merged or written.

Only here is a WeightSpace built: the reference (the base, or the first model) is traced
from its Hugging Face folder, read from a metanet file's metadata, or given by an
in-memory checkpoint (``--family``, ``--model``). Each model marked ``align:`` is matched
onto it, by Git Re-Basin weight matching (streaming), activation matching or the
straight-through estimator (both run the model on data), and checked to compute the same
function as before (:data:`~tasks.align.FUNCTION_TOL` for the model's dtype) before
anything is written. :func:`align_sources` gives the executor one reader per aligned
source (file key -> permuted tensor); :func:`align_checkpoint` writes one aligned
checkpoint (``metanet align``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from metanet.space import Element
from tasks.align import FUNCTION_TOL, AlignmentError, MatchLog
from tasks.checkpoints.checkpoint import Checkpoint, check_compatible, open_checkpoint
from tasks.checkpoints.config import MergeConfig
from tasks.checkpoints.plan import MergePlan

__all__ = ["align_sources", "align_checkpoint", "match_pair", "check_same_layout", "MATCHES"]

MATCHES = ("weight", "activation", "ste")

# config.json fields that fix how a tensor's axes split into groups (heads, head_dim,
# layers): two models whose tensors have equal shapes may still differ here
_LAYOUT_KEYS = (
    "model_type",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "n_head",
    "num_heads",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "num_hidden_layers",
    "n_layer",
)


def check_same_layout(reference: Path, other: Path) -> None:
    """Refuse to align the folder ``other`` in ``reference``'s WeightSpace when their
    ``config.json`` split the axes differently (8 heads of 8 are not 4 heads of 16, though
    every shape agrees): its permutations would be found for the wrong groups and checked
    on the wrong model."""
    import json

    configs = []
    for folder in (Path(reference), Path(other)):
        f = folder / "config.json"
        if not f.is_file():
            return
        try:
            configs.append(json.loads(f.read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AlignmentError(f"{f}: not valid JSON") from None
    for key in _LAYOUT_KEYS:
        a, b = configs[0].get(key), configs[1].get(key)
        if a != b:
            raise AlignmentError(
                f"{other}: config.json has {key}={b!r}, the reference {reference} has "
                f"{key}={a!r}; aligning it in the reference's layout would be wrong "
                "(merge without aligning, or align models of one layout)"
            )


def tree_space(space):
    """The :class:`tasks.align.trees.TreeSpace` of a space made of soft tree ensembles alone
    (every group a tree permutation), else None: such models are matched with their
    subtree flips and level orders as well."""
    from metanet.space import WeightSpaceError
    from tasks.align.trees import TreeSpace

    if not any(name.endswith("split_weight") for name in space.tensors):
        return None
    try:
        trees = TreeSpace.from_space(space)
    except WeightSpaceError:
        return None
    outer = {n for n, grp in space.groups.items() if grp.within is None}
    return trees if outer <= {lay.group for lay in trees.layouts} else None


def symmetry(space):
    """What acts on a space's weights: its :class:`tasks.align.trees.TreeSpace` for soft tree
    ensembles, else the WeightSpace (both have ``apply`` and ``invert``)."""
    return tree_space(space) or space


def moved_groups(space, g) -> tuple[int, int]:
    """How many of the space's groups ``g`` moves, of how many."""
    keys = [k for k in space.groups if k in g]
    moved = sum(int((g[k] != torch.arange(g[k].shape[-1])).any()) for k in keys)
    return moved, len(keys)


def element_reader(ck: Checkpoint, g) -> Callable[[str], Tensor]:
    """``name -> ck's tensor (stored dtype) with g applied``: per tensor for a WeightSpace;
    a tree ensemble's three tensors together (a flip moves a split's weights and its
    subtrees' leaves at once; the trees are small)."""
    from tasks.checkpoints import stream

    trees = tree_space(ck.space) if g is not None else None
    if trees is None:
        return stream.permuted_reader(ck, g)
    names = {n for lay in trees.layouts for n in (lay.weight, lay.bias, lay.leaf)}
    moved = trees.apply({n: ck.read(n) for n in ck.space.tensors}, g)  # apply wants them all
    rest = stream.permuted_reader(ck, g)
    return lambda n: moved[n] if n in names else rest(n)


def _in_memory(ck: Checkpoint, model: torch.nn.Module) -> dict[str, Tensor]:
    """``ck``'s tensors under the model's state-dict names, read into memory."""
    return {n: ck.weights[n] for n in model.state_dict() if n in ck.weights}


def match_pair(
    ref: Checkpoint,
    other: Checkpoint,
    how: str = "weight",
    *,
    data: list | None = None,
    seed: int = 0,
    max_sweeps: int = 100,
    low_memory: bool = False,
    ste_epochs: int = 10,
    ste_lr: float = 1e-2,
    progress: bool = False,
    device: str | torch.device | None = None,
    log: MatchLog | None = None,
) -> tuple[Element, str]:
    """The element of ``ref.space`` permuting ``other`` onto ``ref``, and a summary line.

    ``how``: ``weight`` (Git Re-Basin weight matching, streaming from lazy checkpoints),
    ``activation`` or ``ste`` (run the model, ``other``'s or ``ref``'s, on ``data``: a
    list of ``(inputs, targets)`` batches).
    """
    import copy

    from tasks.align import activation_matching, ste_matching, weight_matching
    from tasks.checkpoints import stream

    log = log if log is not None else MatchLog()
    if how == "weight":
        wa, wb = stream.matching_inputs(ref, other, low_memory=low_memory)
        trees = tree_space(ref.space)
        if trees is not None:  # soft tree ensembles: flips and level orders too
            from tasks.align.trees import match_trees

            start = time.perf_counter()
            g = match_trees(trees, wa, wb)
            log.seconds = time.perf_counter() - start
            return g, "tree matching (permutation, subtree flips, level orders)"
        g = weight_matching(ref.space, wa, wb, seed=seed, max_sweeps=max_sweeps,
                            progress=progress, log=log, device=device)  # fmt: skip
        objective = log.objective
        return g, f"{log.sweeps} sweeps, objective {objective[0]:.4g} -> {objective[-1]:.4g}"
    if how not in MATCHES:
        raise AlignmentError(f"align: {how!r} is not one of {', '.join(MATCHES)}")
    model = other.model or ref.model
    if model is None:
        raise AlignmentError(
            f"align: {how} runs the model on data, and {other.ref} has none (pass --model)"
        )
    if not data:
        raise AlignmentError(f"align: {how} runs the model on data; none was given")
    wa, wb = _in_memory(ref, model), _in_memory(other, model)
    if how == "activation":
        pair = []
        for w in (wa, wb):
            m = copy.deepcopy(model)
            m.load_state_dict(w)
            pair.append(m)
        g = activation_matching(*pair, ref.space, data, seed=seed, log=log)
        return g, f"activation matching on {len(data)} batches"
    g = ste_matching(model, ref.space, wa, wb, data, epochs=ste_epochs, lr=ste_lr, seed=seed,
                     init="activation", progress=progress, log=log)  # fmt: skip
    summary = f"STE from activation matching, {ste_epochs} epochs on {len(data)} batches"
    if log.objective:
        summary += f", midpoint loss {log.objective[0]:.4g} -> {log.objective[-1]:.4g}"
    return g, summary


def _check_function(ref: Checkpoint, other: Checkpoint, g: Element) -> float | None:
    """The max relative error of ``other``'s model output once permuted by ``g`` (None
    when no model is at hand); :class:`AlignmentError` when it is not a relabelling or
    not the same function, to the tolerance of the model's dtype."""
    from tasks.checkpoints import stream

    model = other.model or ref.model
    inputs = other.inputs if other.model is not None else ref.inputs
    sym = symmetry(ref.space)
    if other.lazy is None:
        # in memory: the permutation must be a relabelling, read back exactly
        aligned = sym.apply(other.weights, g)
        back = sym.apply(aligned, sym.invert(g))
        bad = next((k for k in other.weights if not torch.equal(back[k], other.weights[k])), None)
        if bad is not None:
            raise AlignmentError(f"aligned tensor {bad!r} is not a relabelling of {other.ref}")
    if model is None or inputs is None:
        return None
    if other.lazy is None:
        from tasks.align import verify_aligned

        # float64 copies, the model untouched
        return verify_aligned(model, other.weights, aligned, inputs)
    stream.load_into(model, stream.permuted_reader(other, None), list(other.weights))
    want = stream.model_output(model, inputs)
    err = stream.relative_error(other if other.model is not None else ref,
                                element_reader(other, g), want)  # fmt: skip
    tol = FUNCTION_TOL.get(want.dtype, 1e-4)
    if not err < tol:
        raise AlignmentError(
            f"aligning {other.ref} changes its function (max rel. error {err:.1e} > "
            f"{tol:.0e} for {want.dtype}); nothing written"
        )
    return err


def _for_matching(
    source: Checkpoint, ref: Checkpoint | None = None, progress: bool = False
) -> Checkpoint:
    """``source`` opened for matching: lazy reads upcast to float32, a folder read in the
    reference's space (its model built when it is the reference)."""
    if source.lazy is None:  # in memory: its own space, else the reference's
        if source.space is not None:
            return source
        if ref is None:
            raise AlignmentError(
                f"{source.ref}: aligning onto it needs its WeightSpace (give it one: "
                "--family, --model, or spaces= in the Python API)"
            )
        return dataclasses.replace(source, space=ref.space)
    if ref is None:
        ck = open_checkpoint(
            source.path, build_model=source.hf, upcast=torch.float32, progress=progress
        )
        if ck.space is None:
            raise AlignmentError(
                f"{source.ref}: aligning needs its WeightSpace: a Hugging Face folder, a "
                "metanet checkpoint, or a plain state dict with --family or --model"
            )
        return ck
    if source.hf:
        names = ref.lazy.names if ref.lazy is not None else None
        if names is None:
            raise AlignmentError(f"{source.ref}: a folder cannot be aligned to the file {ref.ref}")
        return open_checkpoint(source.path, space=ref.space, names=names, model=ref.model,
                               upcast=torch.float32)  # fmt: skip
    return open_checkpoint(source.path, upcast=torch.float32)


def align_sources(
    config: MergeConfig,
    plan: MergePlan,
    *,
    data: list | None = None,
    seed: int = 0,
    max_sweeps: int = 100,
    low_memory: bool = False,
    ste_epochs: int = 10,
    ste_lr: float = 1e-2,
    progress: bool = False,
    quiet: bool = True,
    device: str | torch.device | None = None,
) -> dict[int, Callable[[str], Tensor]]:
    """Readers for the sources marked ``align:``, permuted onto the plan's reference.

    Every model is matched before any function check: a check streams a model's weights
    into the reference's model, whose tensors the matching may read."""
    from tasks.checkpoints import stream

    # in the config's order: a run is repeatable whatever the hash seed
    wanted = list(dict.fromkeys((e.path, e.align) for e in config.models if e.align != "none"))
    index = {s.ref: i for i, s in enumerate(plan.sources)}
    wanted = [(path, how) for path, how in wanted if index[path] != plan.reference]
    if not wanted:
        return {}
    reference = plan.sources[plan.reference]
    for path, _ in wanted:
        source = plan.sources[index[path]]
        if reference.hf and source.hf:
            check_same_layout(reference.path, source.path)
    ref = _for_matching(reference, progress=progress)
    matched = []
    for path, how in wanted:
        source = plan.sources[index[path]]
        ck = _for_matching(source, ref)
        check_compatible(ref, ck)
        # NaN/inf refused before matching on them, naming the tensor
        stream.check_finite([ref, ck] if not matched else [ck], progress=progress)
        log = MatchLog()
        g, summary = match_pair(
            ref, ck, how, data=data, seed=seed, max_sweeps=max_sweeps, low_memory=low_memory,
            ste_epochs=ste_epochs, ste_lr=ste_lr, progress=progress, device=device, log=log,
        )  # fmt: skip
        matched.append((source, ck, g, log, summary))
    readers: dict[int, Callable[[str], Tensor]] = {}
    for source, ck, g, log, summary in matched:
        err = _check_function(ref, ck, g)
        if not quiet:
            moved, total = moved_groups(ref.space, g)
            checked = "" if err is None else f"; same function (max rel. error {err:.1e})"
            print(
                f"aligned {Path(source.ref).name} to {Path(reference.ref).name}: "
                f"{moved}/{total} groups permuted, {summary}, {log.seconds:.2f} s{checked}",
                file=sys.stderr,
            )
        read = element_reader(ck, g)
        ours = (
            {key: n for n, key in ck.lazy.names.items()} if ck.lazy else {n: n for n in ck.weights}
        )
        readers[index[source.ref]] = lambda key, read=read, ours=ours, src=source: (
            read(ours[key]) if key in ours else src.read(key)
        )
    return readers


def align_checkpoint(
    a: str | Path | Checkpoint,
    b: str | Path | Checkpoint,
    out: str | Path,
    *,
    how: str = "weight",
    data: list | None = None,
    seed: int = 0,
    max_sweeps: int = 100,
    low_memory: bool = False,
    ste_epochs: int = 10,
    ste_lr: float = 1e-2,
    device: str | torch.device | None = None,
    max_shard: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    quiet: bool = True,
    stages=None,
) -> Path:
    """Permute checkpoint ``b`` onto ``a`` and write it: ``metanet align``.

    ``a``/``b``: paths (read lazily, streaming) or checkpoints held in memory
    (:func:`~tasks.checkpoints.checkpoint.load_checkpoint`). ``b`` gives the model whose
    function is checked (a Hugging Face folder: its own config; ``a`` must have the same
    layout): its outputs before, and on the *written* weights streamed back in, must
    agree to :data:`~tasks.align.FUNCTION_TOL` before the output is renamed into place.
    A folder ``b`` gives a drop-in copy of its folder (its shard layout unless
    ``max_shard``); ``out`` ending in ``.safetensors`` (or any ``out`` for a file ``b``)
    one checkpoint carrying the space.
    """
    from tasks.checkpoints import stream

    stages = stages if stages is not None else stream.StageLog()
    if not isinstance(b, Checkpoint):
        b = open_checkpoint(b)
    if not isinstance(a, Checkpoint):
        a = open_checkpoint(a)
    if a.hf and b.hf:
        check_same_layout(b.path, a.path)  # a is read in b's space: it must split its axes alike
    ref = _for_matching(b, progress=progress)
    other = _for_matching(a, ref)
    check_compatible(ref, other)
    stream.check_finite([ref, other], progress=progress)
    stages.done("load + check", quiet)
    if ref.model is not None and ref.lazy is None:
        stream.load_into(ref.model, ref.read, list(ref.weights))  # the model holds b
    reference = stream.model_output(ref.model, ref.inputs) if ref.model is not None else None
    log = MatchLog()
    # b permuted onto a: match a's side as the reference of the matching
    g, summary = match_pair(
        other, ref, how, data=data, seed=seed, max_sweeps=max_sweeps, low_memory=low_memory,
        ste_epochs=ste_epochs, ste_lr=ste_lr, progress=progress, device=device, log=log,
    )  # fmt: skip
    stages.done(f"match {ref.path.name}", quiet)
    if not quiet:
        moved, total = moved_groups(ref.space, g)
        print(
            f"aligned {ref.path} to {other.path}: {moved}/{total} groups permuted, "
            f"{summary}, {log.seconds:.2f} s",
            file=sys.stderr,
        )
    if ref.lazy is None:
        _check_function(other, ref, g)  # relabelling + float64 check before writing

    def check(written: Path) -> None:
        if reference is None:
            return
        err = stream.verify_written(ref, written, reference)
        tol = FUNCTION_TOL.get(reference.dtype, 1e-4)
        if not err < tol:
            raise AlignmentError(
                f"the aligned weights change B's function (max rel. error {err:.1e} > {tol:.0e}); "
                "nothing written"
            )
        if not quiet:
            print(f"same function as {ref.path.name} (max rel. error {err:.1e})", file=sys.stderr)

    from tasks.checkpoints.writer import write_checkpoint

    write_checkpoint(
        ref, Path(out), element_reader(ref, g), progress=progress, check=check,
        max_shard=max_shard, dtype=dtype,
    )  # fmt: skip
    stages.done("apply + write + verify", quiet)
    return Path(out)
