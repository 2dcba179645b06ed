"""Merge configs in mergekit's YAML format.

```yaml
merge_method: ties
base_model: path/to/base
models:
  - model: path/a
    parameters: {weight: 0.5, density: 0.5}
    align: weight        # our extension: none|weight|activation|ste (default none)
  - model: path/b
    parameters: {weight: 0.5, density: [{filter: mlp, value: 0.3}, {value: 0.6}]}
parameters: {normalize: true}
dtype: float16            # optional output dtype
```

A parameter value may be a scalar or, as in mergekit, a list of ``{filter, value}``
entries: the first entry whose ``filter`` is a substring of the tensor name (or which has
no filter, or filter ``"*"``) gives the value. mergekit's numeric "gradient" lists (values
interpolated over layers) are not supported. Relative model paths resolve against the
config file's folder. As in mergekit, the base may also appear in ``models`` (it is then
dropped from the list of models to merge).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.merge_methods import METHODS, check_parameter

__all__ = ["ALIGN_CHOICES", "ModelEntry", "MergeConfig", "load_config", "parse_config"]

ALIGN_CHOICES = ("none", "weight", "activation", "ste")
DTYPES = ("float16", "bfloat16", "float32", "float64")
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype"}
_MODEL_KEYS = {"model", "parameters", "align"}


@dataclass
class ModelEntry:
    path: str
    parameters: dict = field(default_factory=dict)
    align: str = "none"


@dataclass
class MergeConfig:
    method: str
    base: str | None
    models: list[ModelEntry]
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None

    def resolve(self, tensor_name: str) -> tuple[dict, list[dict]]:
        """Global and per-model parameters for one tensor, filters evaluated."""
        params = {k: _evaluate(tensor_name, v, k) for k, v in self.parameters.items()}
        params = {k: v for k, v in params.items() if v is not None}
        model_params = []
        for entry in self.models:
            mp = {k: _evaluate(tensor_name, v, k) for k, v in entry.parameters.items()}
            model_params.append({k: v for k, v in mp.items() if v is not None})
        return params, model_params


def _evaluate(tensor_name: str, setting, key: str):
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or filt in tensor_name:
                return _evaluate(tensor_name, cond["value"], key)
        return None
    raise ValueError(f"parameter {key!r}: unsupported value {setting!r}")


def _check_setting(setting, key: str) -> None:
    if isinstance(setting, (bool, int, float, str)):
        check_parameter(key, setting)  # finite, in range, the right type: before any work
        return
    if isinstance(setting, list) and setting:
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise ValueError(
                    f"parameter {key!r}: list entries must be {{filter: <substring>, value: <value>}} "
                    f"(numeric gradient lists are not supported), got {cond!r}"
                )
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ValueError(
                    f"parameter {key!r}: filter must be a string, got {cond['filter']!r}"
                )
            _check_setting(cond["value"], key)
        return
    raise ValueError(f"parameter {key!r}: unsupported value {setting!r}")


def _params(raw, where: str, allowed) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: 'parameters' must be a mapping, got {raw!r}")
    for key, value in raw.items():
        if key not in allowed:
            raise ValueError(
                f"{where}: unknown parameter {key!r} (allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        _check_setting(value, key)
    return dict(raw)


def _path(p, folder: Path | None, key: str) -> str:
    if not isinstance(p, str) or not p:
        raise ValueError(f"{key!r} must be a non-empty path string, got {p!r}")
    p = os.path.expanduser(p)
    if folder is not None and not os.path.isabs(p):
        return str(folder / p)
    return p


def parse_config(data, folder: str | os.PathLike | None = None) -> MergeConfig:
    """A ``MergeConfig`` from a parsed YAML mapping; relative paths against ``folder``."""
    folder = Path(folder) if folder is not None else None
    if not isinstance(data, dict):
        raise ValueError("merge config must be a YAML mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(
            f"unknown config key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})"
        )
    if "merge_method" not in data:
        raise ValueError("missing key 'merge_method'")
    method = data["merge_method"]
    if method not in METHODS:
        raise ValueError(
            f"merge_method: unknown merge method {method!r} (known: {', '.join(sorted(METHODS))})"
        )
    m = METHODS[method]
    base = data.get("base_model")
    if m.needs_base and base is None:
        raise ValueError(f"missing key 'base_model': merge method {method!r} needs a base model")
    if not m.needs_base and base is not None:
        raise ValueError(f"base_model: merge method {method!r} takes no base model")
    base = _path(base, folder, "base_model") if base is not None else None
    models = data.get("models")
    if not models:
        raise ValueError("missing key 'models': a non-empty list of {model: <path>} entries")
    if not isinstance(models, list):
        raise ValueError("models: must be a list of {model: <path>} entries")
    entries = []
    for i, item in enumerate(models):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise ValueError(f"models[{i}]: missing key 'model'")
        extra = set(item) - _MODEL_KEYS
        if extra:
            raise ValueError(
                f"models[{i}]: unknown key {sorted(extra)[0]!r} (allowed: model, parameters, align)"
            )
        align = item.get("align", "none")
        if align is None or align is False:
            align = "none"
        if align not in ALIGN_CHOICES:
            raise ValueError(
                f"models[{i}].align: must be one of {'|'.join(ALIGN_CHOICES)}, got {align!r}"
            )
        path = _path(item["model"], folder, f"models[{i}].model")
        params = _params(item.get("parameters"), f"models[{i}]", m.model_params)
        entries.append(ModelEntry(path, params, align))
    # mergekit lists the base among the models at times; it then counts as the base only
    if base is not None:
        entries = [e for e in entries if os.path.normpath(e.path) != os.path.normpath(base)]
    if not entries:
        raise ValueError("models: no model besides base_model to merge")
    if method == "slerp" and len(entries) != 1:
        raise ValueError(
            f"models: slerp merges base_model with exactly one other model, got {len(entries)}"
        )
    if method == "model_stock" and len(entries) < 2:
        raise ValueError(
            f"models: model_stock needs at least two models besides base_model, got {len(entries)}"
        )
    params = _params(data.get("parameters"), "parameters", set(m.params) | set(m.model_params))
    for key, default in m.params.items():
        if default is None and key not in params:
            raise ValueError(f"parameters: missing key {key!r} (needed by merge method {method!r})")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return MergeConfig(method, base, entries, params, dtype)


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read a mergekit-style YAML merge config; relative paths resolve against its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_config(data, folder=path.parent)
