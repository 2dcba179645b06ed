"""Merge configs in mergekit's YAML language, plus our ``align:`` stage per model.

```yaml
merge_method: ties
base_model: path/to/base          # or a hub id (org/name, org/name@revision) in the HF cache
models:
  - model: path/a
    parameters: {weight: 0.5, density: 0.5}
    align: weight                 # ours: none|weight|activation|ste (default none)
  - model: path/b
    parameters:
      weight: 0.5
      density: [{filter: mlp, value: 0.3}, {value: 0.6}]   # a filter list
parameters:
  t: [0, 0.5, 0.3, 0.7, 1]        # a gradient over the layers
dtype: bfloat16                   # compute dtype; out_dtype: the written one
tokenizer_source: union           # base | union | a model; or a tokenizer: block
chat_template: chatml
```

or, instead of ``models``, ``slices`` of ``sources`` with ``layer_range: [start, end)``
(frankenmerges; ``passthrough`` stacks them).

A parameter's value is, as in mergekit:

* a scalar;
* a **gradient**, a list of numbers: the value at position ``t`` in ``[0, 1]`` is the
  linear interpolation between the two neighbouring entries of the list spread evenly
  over ``[0, 1]``. Layer ``i`` of a slice of ``n`` layers has ``t = i / (n - 1)`` (``1``
  when ``n = 1``); tensors outside the layers (embeddings, final norm, head) have
  ``t = 0``. A list of booleans or strings picks entry ``int(t * (len - 1))``;
* a **filter list** ``[{filter: substring, value: v}, ...]``: the first entry whose
  filter is a substring of the tensor name (or which has no filter, or ``"*"``) gives
  the value, itself a scalar or a gradient.

Settings resolve from the most specific place: the source's (model's) parameters, then
the slice's, then the global ones. A parameter that mergekit knows but the method does
not use is ignored with a warning (mergekit ignores it silently); an unknown name is an
error, so a typo such as ``densty`` cannot silently turn trimming off. Relative model
paths resolve against the config file's folder.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metanet.io import CheckpointError
from tasks.checkpoints.vocab import TokenizerSpec, TokenSource
from tasks.merge.methods import METHODS, check_parameter

__all__ = [
    "ALIGN_CHOICES",
    "DTYPES",
    "ModelEntry",
    "SliceSource",
    "Slice",
    "MergeConfig",
    "load_config",
    "parse_config",
    "evaluate",
]

ALIGN_CHOICES = ("none", "weight", "activation", "ste")
DTYPES = ("float16", "bfloat16", "float32", "float64")
_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
_MODEL_KEYS = {"model", "parameters", "align"}
_SLICE_KEYS = {"sources", "parameters", "base_model"}
_SOURCE_KEYS = {"model", "layer_range", "parameters", "align"}
# every parameter name mergekit's methods take (0.1.5): a name here that the chosen
# method does not use is ignored with a warning, any other name is an error
MERGEKIT_PARAMETERS = frozenset(
    {
        "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale",
        "int8_mask", "t", "filter_wise", "select_topk", "nuslerp_flatten",
        "nuslerp_row_wise", "max_iter", "tol", "eps", "similarity_threshold",
        "scale", "consensus_method", "sparsification_method", "lambda_", "alpha",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ModelEntry:
    """One model of a ``models:`` config (the base excluded)."""

    path: str
    parameters: dict = field(default_factory=dict)
    align: str = "none"


@dataclass(frozen=True)
class SliceSource:
    """One input of a slice: a model, its layers ``[start, end)`` (None: all), settings."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict = field(default_factory=dict)
    align: str = "none"


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    parameters: dict = field(default_factory=dict)
    base: str | None = None


@dataclass
class MergeConfig:
    """A parsed config. ``slices`` is set for every config: a ``models:`` config is one
    slice whose sources take all layers (the base added last when it is not listed, as
    mergekit does); ``models`` keeps the ``models:`` entries (the base left out)."""

    method: str
    base: str | None
    models: list[ModelEntry]
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    slices: list[Slice] = field(default_factory=list)
    from_slices: bool = False
    tokenizer_source: str | None = None
    chat_template: str | None = None
    ignored: tuple[str, ...] = ()
    source: dict | None = None  # the mapping it was parsed from (written beside outputs)
    tokenizer: TokenizerSpec | None = None  # tokenizer_source or the tokenizer: block

    def paths(self) -> list[str]:
        """Every model the config reads, base first, each once."""
        seen = [self.base] if self.base else []
        for s in self.slices:
            for src in s.sources:
                if src.model not in seen:
                    seen.append(src.model)
        return seen

    def resolve(self, tensor_name: str, t: float = 0.0) -> tuple[dict, list[dict]]:
        """Global and per-model parameters (``models`` order) for one tensor at ``t``."""
        method = METHODS[self.method]
        params = {}
        for key in method.params:
            value = evaluate(tensor_name, self.parameters.get(key), key, t)
            if value is not None:
                params[key] = value
        model_params = []
        for entry in self.models:
            mp = {}
            for key in method.model_params:
                for scope in (entry.parameters, self.parameters):
                    value = evaluate(tensor_name, scope.get(key), key, t)
                    if value is not None:
                        mp[key] = value
                        break
            model_params.append(mp)
        return params, model_params


def evaluate(tensor_name: str, setting, key: str, t: float = 0.0):
    """The value of one setting for ``tensor_name`` at gradient position ``t`` (None:
    the setting is absent, or no filter matched)."""
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        filt = cond.get("filter")
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate(tensor_name, cond["value"], key, t)
    return None


def _check_setting(setting, key: str, top: bool = True) -> None:
    if isinstance(setting, (bool, int, float, str)):
        check_parameter(key, setting)  # finite, in range, the right type: before any work
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            # a gradient: every entry is checked, so every interpolated value is in range
            for e in setting:
                check_parameter(key, e)
            return
        if not top:
            raise ValueError(f"parameter {key!r}: a filter's value must be a scalar or a gradient")
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise ValueError(
                    f"parameter {key!r}: list entries must be all numbers (a gradient) or all "
                    f"{{filter: <substring>, value: <value>}}, got {cond!r}"
                )
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ValueError(
                    f"parameter {key!r}: filter must be a string, got {cond['filter']!r}"
                )
            _check_setting(cond["value"], key, top=False)
        return
    raise ValueError(f"parameter {key!r}: unsupported value {setting!r}")


def _params(raw, where: str, allowed, ignored: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: 'parameters' must be a mapping, got {raw!r}")
    out = {}
    for key, value in raw.items():
        if key not in allowed:
            if key in MERGEKIT_PARAMETERS:
                ignored.append(f"{where}.{key}")
                continue
            raise ValueError(
                f"{where}: unknown parameter {key!r} (allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        _check_setting(value, key)
        out[key] = value
    return out


def _path(p, folder: Path | None, key: str) -> str:
    if not isinstance(p, str) or not p:
        raise ValueError(f"{key!r} must be a non-empty path string, got {p!r}")
    if "+" in p and not os.path.exists(p):
        raise ValueError(f"{key}: {p!r}: LoRA references (model+lora) are not supported")
    p = os.path.expanduser(p)
    if folder is not None and not os.path.isabs(p):
        local = folder / p
        # a hub id (org/name) stays one unless a folder of that name sits beside the config
        if _looks_like_hub_id(p) and not local.exists():
            return p
        return str(local)
    return p


def _looks_like_hub_id(p: str) -> bool:
    name = p.split("@", 1)[0]
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not p.startswith((".", "~"))


def _align(value, where: str) -> str:
    if value is None or value is False:
        return "none"
    if value not in ALIGN_CHOICES:
        raise ValueError(f"{where}.align: must be one of {'|'.join(ALIGN_CHOICES)}, got {value!r}")
    return value


def _layer_range(value, where: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ValueError(
            f"{where}.layer_range: expected [start, end) with 0 <= start < end, got {value!r}"
        )
    return (value[0], value[1])


def _dtype(data, key: str) -> str | None:
    value = data.get(key)
    if value is not None and value not in DTYPES:
        raise ValueError(f"{key}: must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def parse_config(data, folder: str | os.PathLike | None = None) -> MergeConfig:
    """A ``MergeConfig`` from a parsed YAML mapping; relative paths against ``folder``.

    Every value is checked here, before any tensor is read: unknown keys, parameters the
    method does not take, NaN/inf or out-of-range values, malformed slices.
    """
    folder = Path(folder) if folder is not None else None
    if not isinstance(data, dict):
        raise ValueError("merge config must be a YAML mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(
            f"unknown config key {sorted(map(str, unknown))[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})"
        )
    if "merge_method" not in data:
        raise ValueError("missing key 'merge_method'")
    method = data["merge_method"]
    if method not in METHODS:
        raise ValueError(
            f"merge_method: unknown merge method {method!r} (known: {', '.join(sorted(METHODS))})"
        )
    m = METHODS[method]
    ignored: list[str] = []
    allowed_models = set(m.model_params)
    allowed_global = set(m.params) | set(m.model_params)
    base = data.get("base_model")
    base = _path(base, folder, "base_model") if base is not None else None
    if ("models" in data) == ("slices" in data):
        raise ValueError("give exactly one of 'models' or 'slices'")
    models: list[ModelEntry] = []
    slices: list[Slice] = []
    if "models" in data:
        raw = data["models"]
        if not raw or not isinstance(raw, list):
            raise ValueError("models: must be a non-empty list of {model: <path>} entries")
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, dict) or "model" not in item:
                raise ValueError(f"models[{i}]: missing key 'model'")
            extra = set(item) - _MODEL_KEYS
            if extra:
                raise ValueError(
                    f"models[{i}]: unknown key {sorted(map(str, extra))[0]!r} (allowed: model, parameters, align)"
                )
            path = _path(item["model"], folder, f"models[{i}].model")
            params = _params(item.get("parameters"), f"models[{i}]", allowed_models, ignored)
            models.append(ModelEntry(path, params, _align(item.get("align"), f"models[{i}]")))
        listed = [e for e in models if base is not None and _same(e.path, base)]
        if m.uses_base(base is not None):
            # mergekit lists the base among the models at times; it then counts as the base
            models = [e for e in models if base is None or not _same(e.path, base)]
        elif base is not None and not listed:
            # a method without a base (linear, passthrough) merges it as one more model
            models.append(ModelEntry(base))
            if "weight" in m.model_params:
                ignored.append(
                    f"base_model: {method} takes no base; {base} is merged as one more model "
                    "with weight 1 (mergekit asks for its weight)"
                )
        sources = [SliceSource(e.path, None, e.parameters, e.align) for e in models]
        if base is not None and m.uses_base(True):
            base_params = listed[0].parameters if listed else {}
            sources.append(SliceSource(base, None, base_params, "none"))
        slices = [Slice(tuple(sources))]
    else:
        raw = data["slices"]
        if not raw or not isinstance(raw, list):
            raise ValueError("slices: must be a non-empty list of {sources: [...]} entries")
        for i, sl in enumerate(raw):
            where = f"slices[{i}]"
            if not isinstance(sl, dict) or "sources" not in sl:
                raise ValueError(f"{where}: missing key 'sources'")
            extra = set(sl) - _SLICE_KEYS
            if extra:
                raise ValueError(
                    f"{where}: unknown key {sorted(map(str, extra))[0]!r} (allowed: sources, parameters, base_model)"
                )
            if not isinstance(sl["sources"], list) or not sl["sources"]:
                raise ValueError(f"{where}.sources: must be a non-empty list")
            srcs = []
            for j, src in enumerate(sl["sources"]):
                w = f"{where}.sources[{j}]"
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise ValueError(f"{w}: needs 'model' and 'layer_range'")
                extra = set(src) - _SOURCE_KEYS
                if extra:
                    raise ValueError(f"{w}: unknown key {sorted(map(str, extra))[0]!r}")
                srcs.append(
                    SliceSource(
                        _path(src["model"], folder, f"{w}.model"),
                        _layer_range(src["layer_range"], w),
                        _params(src.get("parameters"), w, allowed_models, ignored),
                        _align(src.get("align"), w),
                    )
                )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in srcs}
            if len(lengths) != 1:
                raise ValueError(f"{where}: all sources must span the same number of layers")
            sbase = sl.get("base_model")
            sbase = _path(sbase, folder, f"{where}.base_model") if sbase is not None else None
            slices.append(
                Slice(
                    tuple(srcs),
                    _params(sl.get("parameters"), where, allowed_global, ignored),
                    sbase,
                )
            )
        if any(s.align != "none" for sl in slices for s in sl.sources):
            raise ValueError("align: is supported on 'models:' configs, not on slices")
    if m.needs_base and base is None and not all(s.base for s in slices):
        raise ValueError(f"missing key 'base_model': merge method {method!r} needs a base model")
    if "models" in data:
        if not models:
            raise ValueError("models: no model besides base_model to merge")
        if method == "slerp" and len(models) != 1:
            raise ValueError(
                f"models: slerp merges base_model with exactly one other model, got {len(models)}"
            )
        if method == "model_stock" and len(models) < 2:
            raise ValueError(
                f"models: model_stock needs at least two models besides base_model, got {len(models)}"
            )
        if m.n_models is not None and len(models) != m.n_models:
            uses = m.uses_base(base is not None)
            besides = "besides base_model" if uses else "(base_model counts)"
            count = "exactly one model" if m.n_models == 1 else f"exactly {m.n_models} models"
            raise ValueError(f"models: {method} merges {count} {besides}, got {len(models)}")
    if method == "passthrough" and any(len(s.sources) != 1 for s in slices):
        raise ValueError("slices: passthrough takes exactly one model per slice")
    params = _params(data.get("parameters"), "parameters", allowed_global, ignored)
    for key, default in m.params.items():
        if default is None and key not in params and not any(key in s.parameters for s in slices):
            raise ValueError(f"parameters: missing key {key!r} (needed by merge method {method!r})")
    refs = {m.path for m in models} | {src.model for sl in slices for src in sl.sources}
    tokenizer = _tokenizer_spec(data, folder, refs | ({base} if base else set()))
    tsrc = tokenizer.source if tokenizer is not None else None
    chat = data.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        raise ValueError(f"chat_template: expected a template name or Jinja text, got {chat!r}")
    if chat is not None:  # checked now, not when the merge is written
        from tasks.checkpoints.executor import chat_template_text

        try:
            chat_template_text(chat)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
    for where in ignored:
        if where.startswith("base_model:"):
            warnings.warn(where, stacklevel=2)
            continue
        warnings.warn(
            f"{where}: merge method {method!r} does not use this parameter; ignored",
            stacklevel=2,
        )
    return MergeConfig(
        method,
        base,
        models,
        params,
        _dtype(data, "dtype"),
        _dtype(data, "out_dtype"),
        slices,
        "slices" in data,
        tsrc,
        chat,
        tuple(w for w in ignored if not w.startswith("base_model:")),
        data,
        tokenizer,
    )


def _model_ref(value, folder: Path | None, where: str) -> str:
    if value in ("base", "union"):
        return value
    return _path(value, folder, where)


def _token_source(token: str, raw, folder: Path | None, refs: set[str]) -> TokenSource:
    where = f"tokenizer.tokens.{token}"
    if not isinstance(raw, dict) or not set(raw) <= {"source", "force"}:
        raise ValueError(f"{where}: expected a mapping with source (and force), got {raw!r}")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise ValueError(f"{where}.force: expected true or false, got {force!r}")
    src = raw.get("source")
    if isinstance(src, str):
        out = TokenSource("model", model=_path(src, folder, f"{where}.source"), force=force)
    elif isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
        out = TokenSource("zero", force=force)
    elif isinstance(src, dict) and src.get("kind") == "model_token":
        if not set(src) <= {"kind", "model", "token", "token_id"} or "model" not in src:
            raise ValueError(f"{where}.source: model_token takes model and token or token_id")
        tok, tid = src.get("token"), src.get("token_id")
        if (tok is None) == (tid is None):
            raise ValueError(f"{where}.source: give exactly one of token and token_id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
            raise ValueError(f"{where}.source.token_id: expected a token index, got {tid!r}")
        if tok is not None and not isinstance(tok, str):
            raise ValueError(f"{where}.source.token: expected a string, got {tok!r}")
        model = _path(src["model"], folder, f"{where}.source.model")
        out = TokenSource("model_token", model=model, token=tok, token_id=tid, force=force)
    else:
        raise ValueError(
            f"{where}.source: expected a model, {{kind: zero}} or {{kind: model_token, ...}}, "
            f"got {src!r}"
        )
    if out.model is not None and not any(_same(out.model, r) for r in refs):
        raise ValueError(f"{where}.source: {out.model} is not one of the merged models")
    return out


def _tokenizer_spec(data: dict, folder: Path | None, refs: set[str]) -> TokenizerSpec | None:
    """``tokenizer_source`` or the ``tokenizer:`` block (mergekit refuses both at once)."""
    tsrc, block = data.get("tokenizer_source"), data.get("tokenizer")
    if tsrc is not None and block is not None:
        raise ValueError("tokenizer_source and tokenizer: give one (tokenizer.source is the same)")
    if tsrc is not None:
        if not isinstance(tsrc, str):
            raise ValueError(f"tokenizer_source: expected base, union or a model, got {tsrc!r}")
        return TokenizerSpec(_model_ref(tsrc, folder, "tokenizer_source"))
    if block is None:
        return None
    if not isinstance(block, dict) or not set(block) <= {"source", "tokens", "pad_to_multiple_of"}:
        raise ValueError(
            f"tokenizer: expected a mapping of source, tokens, pad_to_multiple_of, got {block!r}"
        )
    source = block.get("source", "union")  # mergekit's default
    if not isinstance(source, str):
        raise ValueError(f"tokenizer.source: expected base, union or a model, got {source!r}")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ValueError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ValueError(
            f"tokenizer.tokens: expected a mapping of token -> settings, got {tokens!r}"
        )
    parsed = {str(t): _token_source(str(t), raw, folder, refs) for t, raw in tokens.items()}
    return TokenizerSpec(_model_ref(source, folder, "tokenizer.source"), parsed, pad)


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read a mergekit-style YAML merge config; relative paths resolve against its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply") from None
    return parse_config(data, folder=path.parent)
