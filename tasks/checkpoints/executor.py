"""plan → output: read each tensor's inputs, merge, check, stream into shards.

One output tensor is in memory at a time (with its inputs): the peak is bounded by the
largest tensors, not by the model. The output is written beside its target under a
temporary name and renamed into place only when every tensor has been written and
checked finite; a failure leaves nothing (and the previous output, if any, intact).

A folder output is a drop-in Hugging Face folder: the reference model's folder copied as
what it is (:func:`tasks.checkpoints.stream.copy_folder`: no link followed out of it), its weights
replaced by the merged shards with their index, ``config.json`` updated only where the
tensors changed it (``torch_dtype``, the layer count), the tokenizer from
``tokenizer_source``, the ``chat_template`` set, and a model card naming the method and
its inputs, with the config beside it (``mergekit_config.yml``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from torch import Tensor

from metanet.io import SPACE_KEY, CheckpointError
from metanet.shards import INDEX
from tasks.checkpoints.config import MergeConfig
from tasks.checkpoints.plan import MergePlan, TensorPlan
from tasks.merge.methods import merge_tensor

__all__ = ["execute", "merged_tensors", "CHAT_TEMPLATES", "DEFAULT_SHARD"]

DEFAULT_SHARD = 5_000_000_000  # mergekit's default --out-shard-size (5B)
_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
          torch.float64: "float64"}  # fmt: skip
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# chat templates known by name (as mergekit's chat_template: takes them); any other value
# that looks like Jinja is used as the template text itself
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] "
        "+ '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + "
        "message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


_WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")


def _old_weights(name: str) -> bool:
    """A file or folder of the reference's own weights (another format, an index of them,
    mistral's ``original/`` or ``consolidated`` checkpoints)."""
    return (
        name.endswith(_WEIGHT_SUFFIXES)
        or name.endswith(".index.json")
        or name in ("original", "consolidated")
    )


def chat_template_text(value: str) -> str:
    """The template ``chat_template:`` names (its text), or a CheckpointError: neither a
    known name nor Jinja text, or Jinja that does not parse (when jinja2 is installed, as
    with transformers; the tokenizer would fail on it at its first chat)."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        try:
            import jinja2
        except ImportError:
            return value
        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(
                f"chat_template: not valid Jinja ({e.message}, line {e.lineno})"
            ) from None
        return value
    raise CheckpointError(
        f"chat_template: {value!r} is neither a known template ({', '.join(CHAT_TEMPLATES)}) "
        "nor Jinja text"
    )


def merged_tensors(
    plan: MergePlan,
    *,
    readers: Mapping[int, Callable[[str], Tensor]] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[TensorPlan, Tensor]]:
    """``(tensor plan, merged tensor in its written dtype)`` for every output tensor, in
    write order: each input read (``readers[i](key)`` in place of source ``i``'s, e.g. an
    aligned model's permuted tensors), checked finite, merged on ``device`` by the
    method's rule. The next tensor's inputs are read while this one is merged: the disk
    stays busy, and two tensors' inputs are in memory at most."""
    from tasks.checkpoints.stream import require_finite

    readers = dict(readers or {})

    def load(t):
        return [(readers.get(i) or plan.sources[i].read)(key) for i, key in t.inputs]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, plan.tensors[0]) if plan.tensors else None
        for n, t in enumerate(plan.tensors):
            raw = pending.result()
            if n + 1 < len(plan.tensors):
                pending = pool.submit(load, plan.tensors[n + 1])
            for (i, key), v in zip(t.inputs, raw):  # NaN/inf in an input: named there
                require_finite(plan.sources[i].ref, key, v)
            values = []
            for v in raw:
                v = v.to(device)
                values.append(v.to(t.compute_dtype) if t.compute_dtype is not None else v)
            del raw
            if t.vocab:  # each model's rows, reindexed into the output vocabulary
                refs = [plan.sources[i].ref for i, _ in t.inputs]
                values = plan.vocab.reindex(t.name, refs, values)
            if t.compute_dtype is None:  # integer / bool: carried through, never averaged
                if t.name.rsplit(".", 1)[-1] == "num_batches_tracked":
                    # BatchNorm's step counter differs between any two trainings: the
                    # reference model's (the base, else the first) is kept, as PyTorch
                    # reads it only for momentum=None
                    yield t, values[t.base or 0].to(t.dtype)
                    continue
                if any(not torch.equal(v, values[0]) for v in values):
                    raise CheckpointError(
                        f"tensor {t.name!r} ({values[0].dtype}) differs between the inputs; "
                        "integer and bool tensors are carried through, never averaged"
                    )
                yield t, values[0].to(t.dtype)
                continue
            base = values[t.base] if t.base is not None else None
            others = [v for j, v in enumerate(values) if j != t.base]
            try:
                merged = merge_tensor(
                    plan.method,
                    t.name,
                    others,
                    base,
                    params=t.params,
                    model_params=list(t.model_params),
                    seed=seed,
                    compute_dtype=t.compute_dtype,
                )
            except ValueError as e:  # e.g. della's density +- epsilon on this tensor
                raise CheckpointError(f"tensor {t.name!r}: {e}; nothing written") from None
            yield t, merged.to(t.dtype)


def execute(
    plan: MergePlan,
    out: str | os.PathLike,
    *,
    config: MergeConfig | None = None,
    readers: Mapping[int, Callable[[str], Tensor]] | None = None,
    max_shard: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Path:
    """Run ``plan`` into ``out`` (a folder, or one ``.safetensors`` file) through
    :class:`~tasks.checkpoints.writer.Output` (see :func:`merged_tensors` for
    ``readers`` and ``device``)."""
    from tasks.checkpoints.writer import Output

    out = Path(out)
    ref = plan.sources[plan.reference]
    single = out.suffix == ".safetensors" or not ref.hf
    entries = [(t.name, t.shape, t.dtype) for t in plan.tensors]
    total = sum(
        torch.Size(t.shape).numel() * torch.empty((), dtype=t.dtype).element_size()
        for t in plan.tensors
    )
    with Output(out, progress=progress, desc=f"{plan.method} merge", total=total) as o:
        if single:
            meta = {"format": "pt"}
            space = ref.metadata.get(SPACE_KEY)
            if space and [t.name for t in plan.tensors] == list(ref.keys):
                meta[SPACE_KEY] = space  # same tensors, same shapes: the space still holds
            writer = o.shards(entries, single_file=True, metadata=meta)
        else:
            skip = {*ref.files, INDEX, "config.json", "README.md", "mergekit_config.yml"}
            skip |= {p.name for p in ref.path.glob("*.safetensors")}
            # the reference's weights in other formats would load as the unmerged model
            skip |= {p.name for p in ref.path.iterdir() if _old_weights(p.name)}
            o.copy_folder(ref.path, skip=skip)
            if config is not None:
                _tokenizer(config, o.tmp, plan.vocab)
            _write_config(plan, o.tmp)
            _write_card(plan, config, o.tmp)
            writer = o.shards(entries, max_shard=max_shard or DEFAULT_SHARD,
                              metadata={"format": "pt"})  # fmt: skip
        for t, merged in merged_tensors(plan, readers=readers, seed=seed, device=device):
            o.write(writer, t.name, merged)
        return o.commit()


def _write_config(plan: MergePlan, folder: Path) -> None:
    """The reference's ``config.json``, changed only where the written tensors change it."""
    ref = plan.sources[plan.reference]
    if ref.config is None:
        return
    cfg = dict(ref.config)
    floating = [t.dtype for t in plan.tensors if t.dtype.is_floating_point]
    if floating:
        written = max(set(floating), key=floating.count)
        if written in _NAMES:
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
            for key in keys:  # transformers 5 reads dtype, 4 torch_dtype
                cfg[key] = _NAMES[written]
    if plan.vocab is not None:
        cfg["vocab_size"] = plan.vocab.size
    if plan.layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                cfg[key] = plan.layers
                break
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _tokenizer(config: MergeConfig, folder: Path, vocab=None) -> None:
    """The tokenizer of ``tokenizer_source`` (a merged vocabulary's, or a model's files in
    place of the reference's), and the chat template."""
    src = config.tokenizer_source
    if vocab is not None:
        for name in _TOKENIZER_FILES:
            if (folder / name).exists() or (folder / name).is_symlink():
                (folder / name).unlink()
        vocab.tokenizer.save_pretrained(str(folder))
    elif src not in (None, "base", "union"):
        from tasks.checkpoints.checkpoint import resolve_model
        from tasks.checkpoints.stream import cache_blobs, is_cache_blob

        path = resolve_model(src)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer_source: {src} is not a model folder")
        present = [n for n in _TOKENIZER_FILES if (path / n).is_file()]
        if not present:
            raise CheckpointError(f"tokenizer_source: {src} has no tokenizer files")
        root, blobs = os.path.realpath(path), cache_blobs(path)
        for name in _TOKENIZER_FILES:
            if (folder / name).exists() or (folder / name).is_symlink():
                (folder / name).unlink()
        for name in present:
            real = os.path.realpath(path / name)
            # as copy_folder: never a file from outside the source (a cache's blobs aside)
            if os.path.dirname(real) != root and not is_cache_blob(real, blobs):
                raise CheckpointError(
                    f"{path / name}: a symbolic link to {real}, outside its folder; refusing "
                    "to copy it"
                )
            shutil.copyfile(real, folder / name)
    if config.chat_template is not None:
        template = chat_template_text(config.chat_template)
        tc = folder / "tokenizer_config.json"
        data = json.loads(tc.read_text()) if tc.is_file() else {}
        data["chat_template"] = template
        if tc.is_symlink():
            tc.unlink()
        tc.write_text(json.dumps(data, indent=2) + "\n")


def _write_card(plan: MergePlan, config: MergeConfig | None, folder: Path) -> None:
    inputs = "\n".join(f"- `{s.ref}`" for s in plan.sources)
    text = (
        "---\nlibrary_name: transformers\ntags:\n- metanet\n- merge\n---\n"
        f"# merged model\n\nA `{plan.method}` merge of:\n\n{inputs}\n\n"
        "made with [metanet](https://github.com/) `metanet merge`"
        + (" from the config in `mergekit_config.yml`.\n" if config is not None else ".\n")
    )
    (folder / "README.md").write_text(text)
    if config is not None and getattr(config, "source", None) is not None:
        (folder / "mergekit_config.yml").write_text(yaml.safe_dump(config.source, sort_keys=False))
