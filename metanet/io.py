"""Checkpoint I/O: safetensors files that carry their WeightSpace.

``save`` writes to a temporary file beside the target and renames it into place, so an
interrupted save leaves the previous file intact. ``load`` checks the whole file (header,
every tensor present, every shape) before returning anything.
"""

from __future__ import annotations

import os
import tempfile
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
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result honours the umask
    try:
        write(tmp)
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


def _open(path: Path):
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


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
        if not path.exists():
            raise CheckpointError(f"{path}: no such file")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            raise CheckpointError(f"{path}: could not load with weights_only=True: {e}") from None
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
