"""Checkpoint I/O: safetensors files that carry their WeightSpace.

``save`` writes to a temporary file beside the target and renames it into place, so an
interrupted save leaves the previous file intact. ``load`` checks the whole file (header,
every tensor present, every shape) before returning anything.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from metanet.space import WeightSpace, WeightSpaceError

__all__ = ["save", "load", "load_state_dict", "CheckpointError", "SPACE_KEY"]

SPACE_KEY = "metanet.weight_space"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match its space."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600, and so does a writer that replaces the file itself
        # (safetensors' save_file does): the result honours the umask
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(
    path: str | os.PathLike,
    weights: Mapping[str, Tensor],
    space: WeightSpace,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``weights`` and ``space`` to a safetensors file, atomically.

    Every tensor of the space must be present with its shape; tensors the space does not
    describe are refused (they would be lost to every tool that reads the space).
    """
    space.validate(weights, strict=True)
    tensors = {name: weights[name].detach().cpu().contiguous().clone() for name in space.tensors}
    meta = {SPACE_KEY: space.to_json()}
    for k, v in (metadata or {}).items():
        if k == SPACE_KEY:
            raise ValueError(f"metadata key {SPACE_KEY!r} is reserved")
        meta[str(k)] = str(v)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# how a PyTorch pickle starts: torch.save's zip container, or a bare pickle (protocol 2+)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_nonempty(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes); was it written completely?")


def _open(path: Path):
    _check_nonempty(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte header length, then the JSON header's "{"
    if head[8:9] != b"{" and head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(
            f"{path}: a PyTorch pickle (.pt/.pth), not a safetensors file, so it carries no "
            "WeightSpace: read it with metanet.load_state_dict and describe it with "
            "converters.from_state_dict(sd, family=...) (CLI: --family)"
        )
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``, its failures as one CheckpointError each: a
    pickle that would run code is refused by name, never retried unsafely."""
    import pickle
    import re

    _check_nonempty(path)
    protocol = None
    try:
        with warnings.catch_warnings(record=True) as notes:
            # torch's note on a pickle protocol other than its own (2 lines to stderr): kept
            # for the error below, which says it in one
            warnings.simplefilter("always")
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            finally:
                for note in notes:
                    found = re.search(r"pickle protocol (\d+)", str(note.message))
                    if found:
                        protocol = found.group(1)
                    else:
                        warnings.warn_explicit(
                            note.message, note.category, note.filename, note.lineno
                        )
    except pickle.UnpicklingError as e:
        text = str(e)
        if protocol is not None and "GLOBAL" not in text:
            raise CheckpointError(
                f"{path}: pickled with protocol {protocol}, which torch.load(weights_only=True) "
                "cannot read; re-save it with torch.save's default protocol (or as safetensors)"
            ) from None
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused: its pickle calls {found.group(1)}, code rather than tensor "
                "data; metanet loads .pt files only with torch.load(weights_only=True) and "
                "never runs their code. Re-save the plain state dict (safetensors preferred)"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", text, flags=re.S)
        raise CheckpointError(
            f"{path}: not a plain state dict of tensors "
            f"({reason.group(1).strip() if reason else 'the weights-only unpickler refused it'})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).split(". ")[0] or type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt .pt file ({first})") from None


def load(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], WeightSpace]:
    """Read a checkpoint written by :func:`save`: ``(weights, space)``.

    Raises :class:`CheckpointError` naming the file (and the tensor) when the file is
    truncated or corrupt, has no WeightSpace, lacks a tensor, or has a wrong shape.
    """
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
        if SPACE_KEY not in meta:
            raise CheckpointError(
                f"{path}: no WeightSpace in the metadata; not written by metanet.save "
                "(use converters.from_pretrained or converters.from_state_dict)"
            )
        try:
            space = WeightSpace.from_json(meta[SPACE_KEY])
        except (WeightSpaceError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its WeightSpace is invalid: {e}") from None
        keys = set(f.keys())
        for name, spec in space.tensors.items():
            if name not in keys:
                raise CheckpointError(f"{path}: tensor {name!r} of the WeightSpace is missing")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != spec.shape:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {shape}, its WeightSpace says {spec.shape}"
                )
        try:
            weights = {name: f.get_tensor(name).to(device) for name in space.tensors}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: could not read tensor data: {e}") from None
    return weights, space


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A plain state dict from ``.safetensors`` or ``.pt``/``.pth`` (``weights_only``)."""
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        sd = _torch_load(path)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: does not hold a state dict of tensors")
        return dict(sd)
    with _open(path) as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: could not read tensor data: {e}") from None
