"""What streaming checkpoint jobs share: billion-parameter pairs on a laptop.

The engine (:mod:`tasks.checkpoints`) holds about one model plus a few tensors at once,
not several copies of the pair:

* **matching** reads each tensor from disk when a group's step needs it
  (:func:`matching_inputs`: plain reads of safetensors files, cast to float32 per
  tensor for bf16/fp16 inputs, or in memory when they fit) and keeps only the cost
  matrices; the permutations found are small (:func:`permuted_reader` applies them);
* **apply / merge / write** go through the output's tensors in storage order, each
  checked finite (:func:`require_finite`) and written straight into its shard by
  :mod:`tasks.checkpoints.writer`; a Hugging Face output copies the input folder as what
  it is (:func:`copy_folder`: no link followed out of it);
* **verify** runs the one model that is built (from the reference folder, once): its
  outputs on B's weights, then on the written file's, streamed into it in place
  (:func:`verify_written`, :func:`relative_error`).

Also here: the stage log and peak-RSS readings the benchmarks record, and progress bars.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.shards import (
    TMP_MARK,
    LazyWeights,
    umask_mode,
)
from metanet.space import Element
from tasks.checkpoints.checkpoint import Checkpoint

__all__ = [
    "check_finite",
    "copy_folder",
    "cache_blobs",
    "is_cache_blob",
    "verify_written",
    "StageLog",
    "peak_rss_bytes",
]


class NonFiniteError(ValueError):
    """A checkpoint holds NaN or inf values."""


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


@dataclass
class StageLog:
    """Wall time and resident memory after every stage (for the scale benchmark)."""

    stages: list[dict] = field(default_factory=list)
    _t: float = field(default_factory=time.perf_counter)

    def done(self, stage: str, quiet: bool = True) -> None:
        now = time.perf_counter()
        row = {
            "stage": stage,
            "seconds": round(now - self._t, 2),
            "rss_gib": round(current_rss_bytes() / 2**30, 2),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2),
        }
        self.stages.append(row)
        self._t = now
        if not quiet:
            print(
                f"  {stage}: {row['seconds']:.1f} s, peak RSS so far {row['peak_rss_gib']:.2f} GiB",
                file=sys.stderr,
            )


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "B"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
        file=sys.stderr,
    )


def check_finite(cks: Sequence[Checkpoint], progress: bool = False) -> None:
    """Refuse NaN/inf before any work, naming the checkpoint and the first tensor."""
    total = sum(ck.nbytes(list(ck.weights)) for ck in cks)
    with progress_bar(total, "check finite", progress) as bar:
        for ck in cks:
            for name in ck.weights:
                w = ck.read(name)
                require_finite(ck.path, name, w)
                bar.update(w.numel() * w.element_size())


def _all_finite(w: Tensor) -> bool:
    """One read of ``w``, nothing allocated: NaN and inf show in its min or max."""
    lo, hi = torch.aminmax(w)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def require_finite(path, name: str, w: Tensor, then: str = "nothing written") -> None:
    """:class:`NonFiniteError` naming ``path``'s tensor ``name`` if ``w`` has NaN/inf
    (``then``: what the message ends with)."""
    if w.is_floating_point() and w.numel() and not _all_finite(w):
        bad = ~torch.isfinite(w)
        if bad.any():
            nan = int(torch.isnan(w).sum())
            raise NonFiniteError(
                f"{path}: tensor {name!r} has {nan} NaN and "
                f"{int(bad.sum()) - nan} inf values; {then}"
            )


# --------------------------------------------------------------------------- outputs
def cache_blobs(folder: Path) -> str | None:
    """The real path of ``.../models--org--name/blobs`` when ``folder`` is a snapshot of
    the Hugging Face cache (``.../models--org--name/snapshots/<revision>``), whose files are
    links there; None otherwise, and when ``blobs`` is itself a link (it could point
    anywhere)."""
    folder = Path(os.path.realpath(folder))
    snapshots = folder.parent
    repo = snapshots.parent
    if snapshots.name != "snapshots" or not repo.name.startswith(("models--", "datasets--")):
        return None
    blobs = repo / "blobs"
    if blobs.is_symlink() or not blobs.is_dir():
        return None
    return os.path.realpath(blobs)


def is_cache_blob(target: str, blobs: str | None) -> bool:
    """Whether the real path ``target`` is a file directly inside the cache's ``blobs``."""
    return blobs is not None and os.path.dirname(target) == blobs and os.path.isfile(target)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def copy_folder(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Copy the folder ``src`` into ``dst`` (new, or empty) as what it is, never more.

    Files are copied byte for byte with modes from the umask (inputs may be read-only or
    private). A symbolic link is never followed out of ``src``: one that points inside
    it is recreated as a link; one that points outside is refused (a tokenizer file
    linked to a private file in the user's home must not land in an output that will be
    uploaded), except the links of a Hugging Face cache snapshot into its own ``blobs``
    folder, which are copied as the files they stand for. A dangling or looping link is
    refused at once, and so is anything that is not a file, a folder or a link.
    ``skip`` names entries at the top level not to copy (the weight files a writer
    rewrites). Raises :class:`~metanet.io.CheckpointError` naming the entry.
    """
    from metanet.io import CheckpointError

    src = Path(src)
    root = os.path.realpath(src)
    blobs = cache_blobs(src)

    def copy(here: Path, there: Path, top: bool) -> None:
        if not (top and there.is_dir() and not any(there.iterdir())):
            os.mkdir(there, umask_mode(0o777))
        for p in sorted(here.iterdir()):
            if (top and p.name in skip) or TMP_MARK in p.name:
                continue
            if p.is_symlink():
                target = os.path.realpath(p)
                if not os.path.exists(target):
                    raise CheckpointError(
                        f"{p}: a dangling or looping symbolic link; refusing to copy it"
                    )
                if _inside(target, root):
                    # the same link, relative, so it points inside the output too
                    os.symlink(os.path.relpath(target, os.path.realpath(here)), there / p.name)
                    continue
                if is_cache_blob(target, blobs):
                    shutil.copyfile(target, there / p.name)
                    continue
                raise CheckpointError(
                    f"{p}: a symbolic link to {target}, outside the input folder; refusing "
                    "to copy it into the output (replace it by the file it stands for)"
                )
            if p.is_dir():
                copy(p, there / p.name, False)
            elif p.is_file():
                shutil.copyfile(p, there / p.name)
            else:
                raise CheckpointError(f"{p}: not a file, folder or link; refusing to copy it")

    copy(src, Path(dst), True)


# --------------------------------------------------------------------------- verify
def _first_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        return _first_tensor(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple()[0])
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}")


@torch.no_grad()
def load_into(model: nn.Module, read: Callable[[str], Tensor], names: Sequence[str]) -> None:
    sd = model.state_dict()
    for n in names:
        if n in sd:
            sd[n].copy_(read(n))


@torch.no_grad()
def model_output(model: nn.Module, inputs: tuple) -> Tensor:
    return _first_tensor(model(*inputs)).detach().clone()


def verify_written(ck: Checkpoint, written: Path, reference: Tensor) -> float:
    """Stream the written weights into ``ck.model`` and compare its outputs with
    ``reference``: the max error relative to the reference's largest magnitude."""
    if written.is_dir():
        lazy = LazyWeights(written, ck.lazy.names if ck.lazy is not None else None)
    else:
        lazy = LazyWeights(written)
    load_into(ck.model, lambda n: lazy.read(lazy.names[n]), list(lazy))
    got = model_output(ck.model, ck.inputs)
    scale = reference.abs().max().clamp_min(1e-30)
    return float((got - reference).abs().max() / scale)


def relative_error(ck: Checkpoint, read: Callable[[str], Tensor], reference: Tensor) -> float:
    """Stream ``read(name)`` into ``ck.model``; its output's max error against ``reference``
    relative to the reference's largest magnitude."""
    load_into(ck.model, read, list(ck.weights))
    got = model_output(ck.model, ck.inputs)
    scale = reference.abs().max().clamp_min(1e-30)
    return float((got - reference).abs().max() / scale)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown: stream)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def matching_inputs(
    ref: Checkpoint, other: Checkpoint, low_memory: bool = False, fraction: float = 0.6
) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
    """What weight matching reads for ``ref`` and ``other``.

    A side whose model is built reads the model's own tensors (already resident, no copy);
    the other sides are read into memory (float32 for half types) when they fit in
    ``fraction`` of the available RAM, so each step is as fast as in-memory matching; else
    (or with ``low_memory``) every step reads its tensors from disk.
    """
    names = list(ref.space.tensors)  # all of them: weight matching checks the architecture

    def resident(ck):
        if ck.model is None or ck.lazy is None:
            return None  # an in-memory checkpoint's model may hold other weights
        sd = ck.model.state_dict()
        return {n: sd[n].detach() for n in names} if all(n in sd for n in names) else None

    sides = [resident(ref), resident(other)]
    need = sum(ck.nbytes(names) for ck, side in zip((ref, other), sides) if side is None)
    if low_memory or need > fraction * available_bytes():
        return ref.weights, other.weights
    out = []
    for ck, side in zip((ref, other), sides):
        out.append(side if side is not None else {n: ck.weights[n] for n in names})
    return out[0], out[1]


def permuted_reader(ck: Checkpoint, g: Element | None) -> Callable[[str], Tensor]:
    """``name -> tensor of ck (stored dtype), permuted by g`` where the space has it."""
    space = ck.space

    def read(n: str) -> Tensor:
        w = ck.read(n)
        if g is not None and n in space.tensors:
            w = space.apply_tensor(n, w, g)
        return w

    return read
