"""One checkpoint type for every job that reads checkpoints: merge, align, barrier.

A :class:`Checkpoint` is an input as the engine sees it: where it lives, its tensors
(read lazily from safetensors headers, or held in memory for a plain ``.pt`` state dict
or a model at hand), its ``config.json`` when it is a Hugging Face folder, and, only when
an alignment or a function check asks for one, its WeightSpace and model.

* :func:`open_checkpoint` opens a path or a cached hub id from its headers alone: nothing
  is read, no model is built and no WeightSpace traced unless asked (``build_model``);
* :func:`load_checkpoint` holds a checkpoint in memory with its WeightSpace: plain state
  dicts described by a ``family``, or by the ``model`` they belong to.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.io import SPACE_KEY, CheckpointError
from metanet.shards import LazyWeights
from metanet.space import WeightSpace
from tasks.align import AlignmentError

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "load_checkpoint",
    "check_compatible",
    "resolve_model",
    "hub_cache",
]

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
    name, _, revision = str(ref).partition("@")
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
class Checkpoint:
    """One input checkpoint.

    ``weights`` maps tensor names to tensors: a :class:`~metanet.shards.LazyWeights`
    (each access reads the file) or an in-memory dict. Names are the file's keys, except
    for a folder opened with its model, whose names are the model's state-dict keys
    (``weights.names`` maps them to the file's). ``space``, ``model`` and ``inputs``
    (example inputs for a function check) are set only when a job asked for them.
    """

    ref: str
    path: Path
    weights: Mapping[str, Tensor]
    config: dict | None = None
    space: WeightSpace | None = None
    model: nn.Module | None = None
    inputs: tuple | None = None

    @property
    def hf(self) -> bool:
        return self.path.is_dir()

    @property
    def lazy(self) -> LazyWeights | None:
        return self.weights if isinstance(self.weights, LazyWeights) else None

    @property
    def files(self) -> list[str]:
        """Names of the weight files (none for an in-memory checkpoint)."""
        return [f.name for f in self.lazy.files] if self.lazy is not None else []

    @property
    def metadata(self) -> dict[str, str]:
        """The files' safetensors metadata; an in-memory one's space as metanet writes it."""
        if self.lazy is not None:
            return self.lazy.metadata
        return {SPACE_KEY: self.space.to_json()} if self.space is not None else {}

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def shape(self, name: str) -> tuple[int, ...]:
        lazy = self.lazy
        return lazy.info(name)[0] if lazy is not None else tuple(self.weights[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (a lazy read may upcast; :meth:`read` never does)."""
        lazy = self.lazy
        return lazy.info(name)[1] if lazy is not None else self.weights[name].dtype

    def read(self, name: str) -> Tensor:
        """Tensor ``name`` in its stored dtype."""
        lazy = self.lazy
        return lazy.read(lazy.names[name]) if lazy is not None else self.weights[name]

    def nbytes(self, names) -> int:
        total = 0
        for n in names:
            numel = int(torch.Size(self.shape(n)).numel())
            total += numel * torch.empty((), dtype=self.dtype(n)).element_size()
        return total

    def file_order(self) -> list[tuple[str, list[str]]]:
        """``(file name, tensor names in storage order)`` per weight file."""
        lazy = self.lazy
        if lazy is None:
            return [("model.safetensors", list(self.weights))]
        back: dict[str, list[str]] = {}
        for ours, key in lazy.names.items():
            back.setdefault(key, []).append(ours)
        return [(f.name, [back[k][0] for k in keys if k in back]) for f, keys in lazy.order]

    @property
    def keys(self) -> list[str]:
        """Tensor names in storage order (file by file)."""
        return [n for _, names in self.file_order() for n in names]


def _names_for(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """Map the model's state-dict keys to the file's keys: equal, or differing by the
    base-model prefix, or (tied weights) to the file key of the tensor sharing storage."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    sd = model.state_dict()
    out: dict[str, str] = {}
    by_ptr: dict[int, str] = {}
    for k, v in sd.items():
        for cand in (k, k.removeprefix(prefix + "."), f"{prefix}.{k}"):
            if cand in keys:
                out[k] = cand
                by_ptr.setdefault(v.data_ptr(), cand)
                break
    for k, v in sd.items():
        if k not in out and v.data_ptr() in by_ptr:
            out[k] = by_ptr[v.data_ptr()]  # a tied weight saved once
    return out


def _folder_config(path: Path) -> dict | None:
    if not (path / "config.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
    if config.get("auto_map"):
        raise CheckpointError(
            f"{path / 'config.json'}: auto_map asks for remote code, which metanet never runs"
        )
    return config


def _lazy(path: Path, names=None, upcast=None) -> LazyWeights:
    try:
        lazy = LazyWeights(path, names, upcast)
        _require_tensors(path, lazy.entries)
        return lazy
    except CheckpointError:
        raise
    except KeyError as e:
        raise AlignmentError(f"{path}: {e.args[0]} (different architectures?)") from None
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _require_tensors(path: Path, weights) -> None:
    """An input without a single tensor is refused by name (merging onto it would plan
    nothing, and a WeightSpace of nothing describes no network)."""
    if not weights:
        raise CheckpointError(f"{path}: has no tensors")


def open_checkpoint(
    ref: str | os.PathLike,
    *,
    build_model: bool = False,
    space: WeightSpace | None = None,
    names: Mapping[str, str] | None = None,
    model: nn.Module | None = None,
    upcast: torch.dtype | None = None,
    load_state: Callable | None = None,
    progress: bool = False,
) -> Checkpoint:
    """Open ``ref`` (a path or a cached hub id) from its headers: nothing read.

    A Hugging Face folder's WeightSpace comes from its model, built only with
    ``build_model`` (names are then the model's state-dict keys); else ``space`` and
    ``names`` of a checkpoint of the same architecture may be given (its ``model`` lets
    the names follow this folder's own keys). A metanet ``.safetensors`` file carries its
    space. Other files (``.pt``) are read whole by ``load_state(path) -> (weights,
    space)``. ``upcast``: lazy reads of float16/bfloat16 tensors come in this dtype (for
    matching); :meth:`Checkpoint.read` always gives the stored dtype. ``progress``: a bar
    over building a folder's model and tracing its WeightSpace (seconds on a large model).
    """
    ref = str(ref)
    path = resolve_model(ref)
    if path.is_dir():
        config = _folder_config(path)
        if not any(path.glob("*.safetensors")):
            raise CheckpointError(f"{path}: no *.safetensors weights (.bin pickles are not read)")
        if build_model:
            from converters import from_module
            from converters.pretrained import hf_model
            from tasks.checkpoints.stream import progress_bar

            with progress_bar(2, f"load {path.name}", progress, unit="step") as bar:
                bar.set_postfix_str("building the model from config.json")
                model, inputs = hf_model(path)
                bar.update()
                bar.set_postfix_str("tracing its WeightSpace")
                space = from_module(model, inputs)
                bar.update()
            keys = set(_lazy(path).entries)
            names = _names_for(model, keys)
            missing = [n for n in space.tensors if n not in names]
            if missing:
                raise AlignmentError(
                    f"{path}: the model's tensor {missing[0]!r} is not in its weight files"
                )
            # every file tensor is carried to an output, also those outside the model
            names.update({k: k for k in keys if k not in names.values()})
            return Checkpoint(ref, path, _lazy(path, names, upcast), config, space, model, inputs)
        if model is not None:  # this folder's own keys (prefixes may differ from the other's)
            keys = set(_lazy(path).entries)
            names = _names_for(model, keys)
            names.update({k: k for k in keys if k not in names.values()})
            missing = [n for n in (space.tensors if space else ()) if n not in names]
            if missing:
                raise AlignmentError(
                    f"{path}: has no tensor {missing[0]!r} (different architectures?)"
                )
        return Checkpoint(ref, path, _lazy(path, names, upcast), config, space)
    if path.suffix == ".safetensors":
        lazy = _lazy(path, upcast=upcast)
        own = (
            WeightSpace.from_json(lazy.metadata[SPACE_KEY]) if SPACE_KEY in lazy.metadata else None
        )
        return Checkpoint(ref, path, lazy, None, own)
    if load_state is None:
        raise CheckpointError(f"{path}: merges read safetensors files or folders of them")
    weights, own = load_state(path)
    _require_tensors(path, weights)
    return Checkpoint(ref, path, weights, None, own)


def _check_fits(model: nn.Module, weights: Mapping[str, Tensor], path: Path, what: str) -> None:
    """The model must have exactly the checkpoint's tensors, with their shapes."""
    sd = model.state_dict()
    for name, t in weights.items():
        if name not in sd:
            raise CheckpointError(f"{what} does not fit {path}: the model has no tensor {name!r}")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{what} does not fit {path}: tensor {name!r} is "
                f"{tuple(sd[name].shape)} in the model, {tuple(t.shape)} in the checkpoint"
            )
    extra = [n for n in sd if n not in weights]
    if extra:
        raise CheckpointError(
            f"{what} does not fit {path}: the model's tensor {extra[0]!r} is not in it"
        )


def _has_space(path: Path) -> bool:
    """Whether ``path`` is a safetensors file carrying a metanet WeightSpace."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return SPACE_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - the loader reports the precise problem
        return True


def load_checkpoint(
    ref: str | os.PathLike,
    *,
    family: str | None = None,
    activation: str | None = None,
    model: nn.Module | None = None,
    inputs: tuple | None = None,
    model_name: str = "the model",
) -> Checkpoint:
    """Hold ``ref`` in memory with its WeightSpace.

    A Hugging Face folder builds its model; a metanet ``.safetensors`` file carries its
    space; a plain state dict (``.pt``/``.pth``/``.safetensors``) is described by
    ``family`` (see :func:`converters.from_state_dict`) or by the ``model`` it belongs to
    (traced on ``inputs``; ``model_name`` names it in errors). With both a space and a
    ``model``, the model must fit the tensors exactly.
    """
    from metanet.io import load, load_state_dict

    ref = str(ref)
    path = resolve_model(ref)
    if path.is_file() and path.suffix.lower() not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CheckpointError(
            f"{path}: not a checkpoint; metanet reads .safetensors and .pt/.pth/.bin state "
            "dicts and Hugging Face folders"
        )
    if path.is_dir():
        from converters import from_module
        from converters.pretrained import hf_model

        built, example = hf_model(path)
        space = from_module(built, example)
        # a copy: writing an output loads into this model, which must not alter inputs
        weights = {k: v.detach().clone() for k, v in built.state_dict().items()}
        return Checkpoint(ref, path, weights, _folder_config(path), space, built, example)
    if model is not None and family is None and not _has_space(path):
        # a plain state dict and the model it belongs to: the space is the model's
        from converters import from_module

        weights = load_state_dict(path)
        _require_tensors(path, weights)
        _check_fits(model, weights, path, model_name)
        if inputs is None:
            raise CheckpointError(
                f"{path}: has no embedded WeightSpace, so {model_name} is traced for one, "
                "which needs example inputs: pass --input-shape (e.g. 1,3,32,32) or have "
                "the factory return (model, example_inputs)"
            )
        return Checkpoint(ref, path, weights, None, from_module(model, inputs), model, inputs)
    if family is not None:
        from converters import from_state_dict

        weights = load_state_dict(path)
        _require_tensors(path, weights)
        # a .safetensors file stores its tensors sorted: the modules' order comes from names
        order = "natural" if path.suffix == ".safetensors" else "given"
        space = from_state_dict(weights, family, activation=activation, order=order)
    elif _has_space(path):
        weights, space = load(path)
    else:
        from converters import FAMILIES

        raise CheckpointError(
            f"{path}: has no embedded WeightSpace; pass --family ({', '.join(FAMILIES)}) to "
            "describe its plain state dict"
        )
    if model is not None:
        _check_fits(model, weights, path, model_name)
    return Checkpoint(ref, path, weights, None, space, model, inputs)


def check_compatible(ref: Checkpoint, other: Checkpoint) -> None:
    """Same tensors with the same shapes (read from headers) and the same WeightSpace,
    or an error naming the first difference."""
    for name, t in ref.space.tensors.items():
        for ck in (ref, other):
            if name not in ck.weights:
                raise AlignmentError(
                    f"{ck.path}: has no tensor {name!r} (different architectures?)"
                )
            if ck.shape(name) != t.shape:
                raise AlignmentError(
                    f"tensor {name!r}: {ck.path} has shape {ck.shape(name)}, {ref.path} has "
                    f"{t.shape} (different architectures?)"
                )
    if other.space is not None and other.space != ref.space:
        raise AlignmentError(
            f"{ref.path} and {other.path} have the same tensors but different symmetry "
            "(WeightSpaces differ); were they converted with different settings?"
        )
