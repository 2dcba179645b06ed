"""The one way a checkpoint job writes its output.

:class:`Output` builds ``out`` beside its target under a temporary name
(:func:`metanet.shards.tmp_beside`): a folder copied from the reference (no link
followed out of it) and/or shards written one tensor at a time
(:class:`metanet.shards.ShardWriter`), each tensor checked finite as it is written. Only
when every tensor is written, and an optional check of the complete output passed, is it
renamed into place; a failure or an interrupt leaves nothing (and the previous output
intact), and the next run removes what a killed one left.

:func:`write_checkpoint` writes every tensor of one checkpoint, read through a function
(``metanet align``'s permuted copy); the merge executor writes its plan through
:class:`Output` too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from metanet.io import SPACE_KEY
from metanet.shards import (
    INDEX,
    ShardWriter,
    move_into_place,
    read_index,
    remove_stale,
    tmp_beside,
)
from tasks.checkpoints.checkpoint import Checkpoint

__all__ = ["Output", "write_checkpoint"]


class Output:
    """``with Output(out) as o:`` write into ``o.tmp`` (``o.copy_folder``, ``o.shards``,
    ``o.write``), then ``o.commit()``; leaving the block without committing removes it."""

    def __init__(self, out: str | os.PathLike, *, progress: bool = False, desc: str = "write",
                 total: int | None = None):  # fmt: skip
        self.out = Path(out)
        self.tmp = tmp_beside(self.out)
        self.writers: list[ShardWriter] = []
        self._bar_args = (total, desc, progress)
        self._bar = None
        self._done = False

    def __enter__(self) -> Output:
        from tasks.checkpoints.stream import progress_bar

        remove_stale(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._bar = progress_bar(*self._bar_args)
        return self

    def copy_folder(self, src: Path, skip: Iterable[str] = ()) -> Path:
        """``src``'s files and subfolders as what they are (no link followed out of it)."""
        from tasks.checkpoints.stream import copy_folder

        copy_folder(src, self.tmp, skip=set(skip))
        return self.tmp

    def shards(self, entries, *, name: str | None = None, **kwargs) -> ShardWriter:
        """A :class:`ShardWriter` for ``entries`` (``(key, shape, dtype)`` in write order)
        into the output (a folder of shards; ``single_file=True``: one file, ``name`` in
        the folder or the output itself)."""
        target = self.tmp / name if name else self.tmp
        writer = ShardWriter(target, entries, **kwargs)
        self.writers.append(writer)
        return writer

    def write(self, writer: ShardWriter, key: str, tensor: Tensor, name: str | None = None) -> None:
        """Write one tensor (refused when it holds NaN/inf, naming ``name or key``)."""
        from tasks.checkpoints.stream import require_finite

        require_finite("the output", name or key, tensor)
        writer.write(key, tensor.cpu())
        self._bar.update(tensor.numel() * tensor.element_size())

    def commit(self, check: Callable[[Path], None] | None = None) -> Path:
        """Close the shards, run ``check(temporary output)``, rename into place."""
        for w in self.writers:
            w.close()
        if check is not None:
            check(self.tmp)
        move_into_place(self.tmp, self.out)
        self._done = True
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if self._done:
            return
        for w in self.writers:
            w.abort()
        if self.tmp.exists() or self.tmp.is_symlink():
            shutil.rmtree(self.tmp) if self.tmp.is_dir() else self.tmp.unlink()


def _weight_names(folder: Path) -> list[str]:
    return [p.name for p in folder.glob("*.safetensors")] + [INDEX]


def write_checkpoint(
    ref: Checkpoint,
    out: str | os.PathLike,
    tensor: Callable[[str], Tensor],
    *,
    max_shard: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    metadata: Mapping[str, str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``tensor(name)`` for every tensor of ``ref``, streaming, into ``out``.

    ``out`` ending in ``.safetensors`` (or any ``out`` for a file ``ref``): one metanet
    checkpoint (the space in its metadata); otherwise (a Hugging Face ``ref``) a copy of
    ``ref``'s folder with the weights rewritten, in ``ref``'s shard layout unless
    ``max_shard`` is given. ``dtype`` casts the floating tensors. ``check(written)`` runs
    on the complete temporary output before it is renamed into place: if it raises,
    nothing is replaced.
    """
    out = Path(out)
    single = out.suffix == ".safetensors" or not ref.hf
    order = ref.file_order()
    names = [n for _, ns in order for n in ns]
    # a copied folder keeps the file's tensor names (ours are the model's state-dict keys)
    keep_keys = ref.lazy is not None and not single
    ours: dict[str, str] = {}

    def planned(n):
        dt = ref.dtype(n)
        if dtype is not None and dt.is_floating_point:
            dt = dtype
        key = ref.lazy.names[n] if keep_keys else n
        ours[key] = n
        return (key, ref.shape(n), dt)

    if single and set(names) != set(ref.space.tensors):
        names = [n for n in names if n in ref.space.tensors]  # exactly the space's tensors
    with Output(out, progress=progress, desc="apply + write", total=ref.nbytes(names)) as o:
        if single:
            meta = {"format": "pt", SPACE_KEY: ref.space.to_json(), **(metadata or {})}
            o.shards([planned(n) for n in names], single_file=True, metadata=meta)
        else:
            o.copy_folder(ref.path, skip=_weight_names(ref.path))
            meta = {"format": "pt", **{k: v for k, v in ref.metadata.items() if k != SPACE_KEY}}
            if max_shard is None:  # the reference's own files
                for fname, ns in order:
                    o.shards([planned(n) for n in ns], name=fname, single_file=True, metadata=meta)
                if read_index(ref.path) is not None:  # checked: its files stay inside
                    (o.tmp / INDEX).write_bytes((ref.path / INDEX).read_bytes())
            else:
                o.shards([planned(n) for n in names], max_shard=max_shard, metadata=meta)
        for w in o.writers:
            for shard in w.shards:
                for key, _, dt, _ in shard:
                    t = tensor(ours[key])
                    o.write(w, key, t if t.dtype == dt else t.to(dt), name=ours[key])
        return o.commit(check)
