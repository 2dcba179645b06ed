"""The alignment stage of a merge plan: permute models onto the reference before merging.

Only here is a WeightSpace built: the reference (the base, or the first model) is traced
from its Hugging Face folder (or read from a metanet file's metadata), each model marked
``align: weight`` is matched onto it by Git Re-Basin weight matching (streaming), and
each aligned model is checked to compute the same function as before, on the one model
built, with its own weights streamed in. The result is one reader per aligned source for
the executor: file key -> permuted tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from tasks.align import FUNCTION_TOL, AlignmentError
from tasks.checkpoints.config import MergeConfig
from tasks.checkpoints.plan import MergePlan

__all__ = ["align_sources", "align_checkpoint", "check_same_layout"]

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


def align_sources(
    config: MergeConfig,
    plan: MergePlan,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    low_memory: bool = False,
    progress: bool = False,
    quiet: bool = True,
    device: str | torch.device | None = None,
) -> dict[int, Callable[[str], Tensor]]:
    """Readers for the sources marked ``align: weight``, permuted onto the reference."""
    from tasks import stream
    from tasks.align import MatchLog, weight_matching

    # in the config's order: a run is repeatable whatever the hash seed
    wanted = list(dict.fromkeys(e.path for e in config.models if e.align == "weight"))
    others = {e.align for e in config.models} - {"none", "weight"}
    if others:
        raise AlignmentError(
            f"align: {sorted(others)[0]} runs the model on data; it is not a streaming stage"
        )
    index = {s.ref: i for i, s in enumerate(plan.sources)}
    wanted = [path for path in wanted if index[path] != plan.reference]
    if not wanted:
        return {}
    reference = plan.sources[plan.reference]
    for path in wanted:
        check_same_layout(reference.path, plan.sources[index[path]].path)
    ref = stream.open_checkpoint(reference.path, build_model=reference.hf)
    matched = []
    # every model is matched before any function check: a check streams the model's
    # weights into the reference's model, whose tensors the matching reads
    for path in wanted:
        source = plan.sources[index[path]]
        if source.hf:
            ck = stream.open_checkpoint(
                source.path, space=ref.space, names=ref.lazy.names, model=ref.model
            )
        else:
            ck = stream.open_checkpoint(source.path)
        stream.check_compatible(ref, ck)
        log = MatchLog()
        wa, wb = stream.matching_inputs(ref, ck, low_memory=low_memory)
        g = weight_matching(
            ref.space,
            wa,
            wb,
            seed=seed,
            max_sweeps=max_sweeps,
            progress=progress,
            log=log,
            device=device,
        )
        matched.append((path, source, ck, g, log))
    readers: dict[int, Callable[[str], Tensor]] = {}
    for path, source, ck, g, log in matched:
        if ref.model is not None:
            # the aligned model must compute what it computed before, on its own weights
            stream.load_into(ref.model, stream.permuted_reader(ck, None), list(ck.weights))
            want = stream.model_output(ref.model, ref.inputs)
            err = stream.relative_error(ref, stream.permuted_reader(ck, g), want)
            tol = FUNCTION_TOL.get(want.dtype, 1e-4)
            if not err < tol:
                raise AlignmentError(
                    f"aligning {source.ref} changes its function (max rel. error {err:.1e} > "
                    f"{tol:.0e} for {want.dtype}); nothing written"
                )
        moved = sum(int((v != torch.arange(v.shape[-1])).any()) for v in g.values())
        if not quiet:
            print(
                f"aligned {Path(source.ref).name} to {Path(reference.ref).name}: {moved}/{len(g)} "
                f"groups permuted, {log.sweeps} sweeps, {log.seconds:.2f} s",
                file=sys.stderr,
            )
        read = stream.permuted_reader(ck, g)
        ours = {key: name for name, key in ck.lazy.names.items()} if ck.lazy else {}
        readers[index[path]] = lambda key, read=read, ours=ours, src=source: (
            read(ours[key]) if key in ours else src.read(key)
        )
    return readers


def align_checkpoint(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    low_memory: bool = False,
    device: str | torch.device | None = None,
    max_shard: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    quiet: bool = True,
    stages=None,
) -> Path:
    """Permute checkpoint ``b`` onto ``a`` (weight matching), streaming, and write it.

    ``b`` builds the model whose function is checked (a Hugging Face folder: its own
    config; ``a`` must have the same layout): its outputs before, and on the *written*
    weights streamed back in, must agree to :data:`~tasks.align.FUNCTION_TOL` before the
    output is renamed into place. A folder ``b`` gives a drop-in copy of its folder (its
    shard layout unless ``max_shard``); ``out`` ending in ``.safetensors`` one checkpoint
    carrying the space.
    """
    from tasks import stream
    from tasks.align import MatchLog, weight_matching

    stages = stages if stages is not None else stream.StageLog()
    b, a = Path(b), Path(a)
    ref = stream.open_checkpoint(b, build_model=b.is_dir())
    if a.is_dir():
        check_same_layout(b, a)  # a is read in b's space: it must split its axes alike
        other = stream.open_checkpoint(a, space=ref.space, names=ref.lazy.names, model=ref.model)
    else:
        other = stream.open_checkpoint(a)
    stream.check_compatible(ref, other)
    stream.check_finite([ref, other], progress=progress)
    stages.done("load + check", quiet)
    reference = stream.model_output(ref.model, ref.inputs) if ref.model is not None else None
    log = MatchLog()
    wa, wb = stream.matching_inputs(other, ref, low_memory=low_memory)
    g = weight_matching(
        ref.space, wa, wb, seed=seed, max_sweeps=max_sweeps, progress=progress, log=log,
        device=device,
    )  # fmt: skip
    stages.done(f"match {ref.path.name}", quiet)
    if not quiet:
        moved = sum(int((v != torch.arange(v.shape[-1])).any()) for v in g.values())
        print(
            f"aligned {ref.path} to {other.path}: {moved}/{len(g)} groups permuted, "
            f"{log.sweeps} sweeps, objective {log.objective[0]:.4g} -> {log.objective[-1]:.4g}, "
            f"{log.seconds:.2f} s",
            file=sys.stderr,
        )

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

    stream.write_output(
        ref, Path(out), stream.permuted_reader(ref, g), progress=progress, check=check,
        max_shard=max_shard, dtype=dtype,
    )  # fmt: skip
    stages.done("apply + write + verify", quiet)
    return Path(out)
