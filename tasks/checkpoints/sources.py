"""The inputs of a merge, read from their headers: local folders, files and hub ids.

A :class:`Source` knows a checkpoint's tensors (names, shapes, dtypes from the safetensors
headers, nothing read), its ``config.json`` when it is a Hugging Face folder, and where
it lives. No model is built and no WeightSpace traced: that happens only when an
alignment stage or a function check asks for one.

Hub ids (``org/name``, ``org/name@revision``) resolve offline from the local Hugging Face
cache, laid out as ``huggingface_hub`` lays it out::

    $HF_HUB_CACHE/models--org--name/refs/main          (a commit hash)
    $HF_HUB_CACHE/models--org--name/snapshots/<hash>/  (links into ../../blobs)

``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metanet.io import CheckpointError
from metanet.shards import LazyWeights

__all__ = ["Source", "open_source", "resolve_model", "hub_cache"]

_HASH = re.compile(r"^[0-9a-f]{40}$")


def hub_cache() -> Path:
    """The folder huggingface_hub keeps its model cache in."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model(ref: str) -> Path:
    """A local path for ``ref``: the path itself when it exists, else the hub id's
    snapshot in the local cache. A :class:`CheckpointError` naming the reference when it
    is neither (nothing is downloaded)."""
    path = Path(ref)
    if path.exists():
        return path
    name, _, revision = ref.partition("@")
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"{ref}: no such file or folder")
    cache = hub_cache()
    repo = cache / f"models--{parts[0]}--{parts[1]}"
    revision = revision or "main"
    commit = revision if _HASH.match(revision) else None
    if commit is None and (repo / "refs" / revision).is_file():
        commit = (repo / "refs" / revision).read_text().strip()
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise CheckpointError(
            f"{ref}: not a local path, and not in the Hugging Face cache ({cache}, revision "
            f"{revision}); download it first (huggingface-cli download {name}) or give its folder"
        )
    return snapshot


@dataclass
class Source:
    """One input checkpoint: its reference as written, local path, tensors and config."""

    ref: str
    path: Path
    weights: LazyWeights
    config: dict | None = None
    files: list[str] = field(default_factory=list)

    @property
    def hf(self) -> bool:
        return self.path.is_dir()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.weights.info(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        return self.weights.info(key)[1]

    def __contains__(self, key: str) -> bool:
        return key in self.weights.entries

    def read(self, key: str) -> torch.Tensor:
        return self.weights.read(key)

    @property
    def keys(self) -> list[str]:
        """Tensor names in storage order (file by file)."""
        return [k for _, keys in self.weights.order for k in keys]


def open_source(ref: str) -> Source:
    """Open ``ref`` (a path or a cached hub id) from its headers alone."""
    path = resolve_model(ref)
    if path.is_dir():
        config = None
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{path / 'config.json'}: not valid JSON") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
            if config.get("auto_map"):
                raise CheckpointError(
                    f"{path / 'config.json'}: auto_map asks for remote code, which metanet "
                    "never runs"
                )
        if not any(path.glob("*.safetensors")):
            raise CheckpointError(f"{path}: no *.safetensors weights (.bin pickles are not read)")
    elif path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: merges read safetensors files or folders of them")
    try:
        weights = LazyWeights(path)
    except CheckpointError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    files = [f.name for f in weights.files]
    return Source(ref, path, weights, config if path.is_dir() else None, files)
