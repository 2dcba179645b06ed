"""The types a serialized WeightSpace must have, checked before any object is built.

:meth:`metanet.WeightSpace.from_json` reads JSON from files (safetensors metadata,
``space.json`` of a weight dataset) that anyone can edit. Python would coerce many wrong
values silently (``int(128.7) == 128``, a string's characters as a list) or fail deep in
a constructor; :func:`check_space_dict` instead names the first field of the wrong type,
by its path in the document: ``groups['h1'].size must be an integer, got 128.7``,
``norm_scales['conv1'].members[0][1] must be an integer, got '0'``.
"""

from __future__ import annotations

from typing import Any

from metanet.space import WeightSpaceError

__all__ = ["check_space_dict"]


def _fail(path: str, want: str, got: Any) -> None:
    raise WeightSpaceError(f"WeightSpace JSON: {path} must be {want}, got {got!r}")


def _obj(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        _fail(path, "an object", value)
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        _fail(path, "a list", value)
    return value


def _int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, "an integer", value)


def _size(value: Any, path: str) -> None:
    _int(value, path)
    if value < 0:
        _fail(path, "a size (>= 0)", value)


def _str(value: Any, path: str, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        _fail(path, "a string" + (" or null" if optional else ""), value)


def _axis(value: Any, path: str) -> None:
    """An axis: a list of segments, each a list of ``[group or null, size]`` factors."""
    for i, seg in enumerate(_list(value, path)):
        for j, factor in enumerate(_list(seg, f"{path}[{i}]")):
            where = f"{path}[{i}][{j}]"
            if not isinstance(factor, list) or len(factor) != 2:
                _fail(where, "a [group or null, size] pair", factor)
            _str(factor[0], f"{where}[0]", optional=True)
            _size(factor[1], f"{where}[1]")


def check_space_dict(d: Any) -> None:
    """Raise :class:`WeightSpaceError` naming the first field of ``d`` (a parsed
    ``metanet.WeightSpace/1`` document) whose type is wrong. Missing optional fields are
    fine; what each field means is checked by the WeightSpace itself."""
    _obj(d, "the document")
    if d.get("format") != "metanet.WeightSpace/1":
        raise WeightSpaceError(f"not a metanet WeightSpace (format={d.get('format')!r})")
    for key in ("groups", "tensors"):
        if key not in d:
            raise WeightSpaceError(f"WeightSpace JSON: lacks {key!r}")
    for name, g in _obj(d["groups"], "groups").items():
        where = f"groups[{name!r}]"
        _obj(g, where)
        if "size" not in g:
            raise WeightSpaceError(f"WeightSpace JSON: {where} lacks 'size'")
        _size(g["size"], f"{where}.size")
        for key in ("within", "action"):
            _str(g.get(key), f"{where}.{key}", optional=True)
    for name, s in _obj(d.get("neuron_sets", {}), "neuron_sets").items():
        where = f"neuron_sets[{name!r}]"
        _obj(s, where)
        if "axis" not in s:
            raise WeightSpaceError(f"WeightSpace JSON: {where} lacks 'axis'")
        _axis(s["axis"], f"{where}.axis")
        _str(s.get("kind", "hidden"), f"{where}.kind")
        _int(s.get("layer", 0), f"{where}.layer")
    for name, t in _obj(d["tensors"], "tensors").items():
        where = f"tensors[{name!r}]"
        _obj(t, where)
        for key in ("shape", "axes"):
            if key not in t:
                raise WeightSpaceError(f"WeightSpace JSON: {where} lacks {key!r}")
        for i, n in enumerate(_list(t["shape"], f"{where}.shape")):
            _size(n, f"{where}.shape[{i}]")
        for i, axis in enumerate(_list(t["axes"], f"{where}.axes")):
            _axis(axis, f"{where}.axes[{i}]")
        for key in ("role", "kind", "dtype"):
            _str(t.get(key, ""), f"{where}.{key}")
        for key in ("out_set", "in_set"):
            _str(t.get(key), f"{where}.{key}", optional=True)
        for key in ("out_axis", "in_axis"):
            if t.get(key) is not None:
                _int(t[key], f"{where}.{key}")
    for i, pair in enumerate(_list(d.get("identities", []), "identities")):
        if not (isinstance(pair, list) and len(pair) == 2):
            _fail(f"identities[{i}]", "a [src_set, dst_set] pair", pair)
        for j, s in enumerate(pair):
            _str(s, f"identities[{i}][{j}]")
    for i, note in enumerate(_list(d.get("notes", []), "notes")):
        _str(note, f"notes[{i}]")
    for name, ns in _obj(d.get("norm_scales", {}), "norm_scales").items():
        _norm_scale(ns, f"norm_scales[{name!r}]")


def _norm_scale(ns: Any, where: str) -> None:
    """A norm scale: ``{"size": int, "members": [[tensor, axis or null, power], ...],
    "norms": [str, ...]}`` (``norms`` optional)."""
    _obj(ns, where)
    for key in ("size", "members"):
        if key not in ns:
            raise WeightSpaceError(f"WeightSpace JSON: {where} lacks {key!r}")
    _size(ns["size"], f"{where}.size")
    for i, m in enumerate(_list(ns["members"], f"{where}.members")):
        at = f"{where}.members[{i}]"
        if not isinstance(m, list) or len(m) != 3:
            _fail(at, "a [tensor, axis or null, power] triple", m)
        _str(m[0], f"{at}[0]")
        if m[1] is not None:
            _int(m[1], f"{at}[1]")
        _int(m[2], f"{at}[2]")
    for i, n in enumerate(_list(ns.get("norms", []), f"{where}.norms")):
        _str(n, f"{where}.norms[{i}]")
