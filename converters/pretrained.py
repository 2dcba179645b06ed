"""``from_pretrained``: WeightSpaces of checkpoints on disk.

* a Hugging Face folder (``config.json`` + ``*.safetensors``): the model class named in
  the config is built with ``transformers`` (optional extra ``metanet[hf]``), its weights
  loaded offline, and traced by :func:`converters.from_module` on dummy inputs made from
  the config (token ids, or pixels for vision models);
* a safetensors file written by :func:`metanet.save`: its embedded WeightSpace.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.io import CheckpointError, load
from metanet.shards import read_index
from metanet.space import WeightSpace

__all__ = ["from_pretrained", "load_pretrained", "hf_model"]


def hf_model(folder: str | os.PathLike) -> tuple[nn.Module, tuple]:
    """Build the model of a Hugging Face folder offline, with example inputs."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no *.safetensors weights (.bin pickles are not read)")
    read_index(folder)  # its entries must stay inside the folder (transformers would follow)
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{folder}: reading Hugging Face folders needs transformers (pip install 'metanet[hf]')"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    where = folder / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' loaders raise many kinds
        raise CheckpointError(f"{where}: transformers cannot read it ({_first_line(e)})") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # a returned key/value cache would pin the heads
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is not None and not (
        isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    ):
        # "architectures" names a class to build: only models, never another attribute
        raise CheckpointError(
            f"{where}: architectures names {arch!r}, which is not a transformers model class"
        )
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
        )
    except Exception as e:  # noqa: BLE001 - a config that disagrees with the weights, ...
        raise CheckpointError(
            f"{folder}: transformers cannot build its {cls.__name__} ({_first_line(e)})"
        ) from None
    model.eval()
    return model, _dummy_inputs(config)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _dummy_inputs(config) -> tuple:
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        length = min(8, getattr(config, "max_position_embeddings", 8) or 8)
        return (torch.randint(0, vocab, (2, length), generator=gen),)
    size = getattr(config, "image_size", None)
    if size:
        ch = getattr(config, "num_channels", 3)
        return (torch.randn(2, ch, size, size, generator=gen),)
    raise CheckpointError(
        "cannot make example inputs for this config (no vocab_size or image_size); "
        "build the model yourself and call converters.from_module(model, inputs)"
    )


def load_pretrained(path: str | os.PathLike) -> tuple[dict[str, Tensor], WeightSpace]:
    """``(weights, space)`` of a Hugging Face folder or a metanet safetensors file."""
    from converters.module import from_module

    path = Path(path)
    if path.is_dir():
        model, inputs = hf_model(path)
        space = from_module(model, inputs)
        return {k: v.detach() for k, v in model.state_dict().items()}, space
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return load(path)


def from_pretrained(path: str | os.PathLike) -> WeightSpace:
    """The WeightSpace of a Hugging Face folder or of a metanet safetensors file."""
    return load_pretrained(path)[1]
