"""Safetensors checkpoints read and written one tensor at a time.

``LazyWeights`` is a read-only ``Mapping[str, Tensor]`` over a ``.safetensors`` file or a
folder of them (sharded with ``model.safetensors.index.json`` or not): shapes and dtypes
come from the headers, and a tensor is read from disk (plain reads, no memory map, so
nothing stays resident) only when it is asked for. ``ShardWriter`` writes tensors one at a
time into shards of a bounded size, with the index Hugging Face uses; its files appear
under a temporary name and are renamed into place when closed, so an interrupted write
never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from metanet.io import CheckpointError

__all__ = [
    "LazyWeights",
    "ShardWriter",
    "parse_size",
    "weight_files",
    "read_index",
    "TMP_MARK",
    "remove_stale",
    "tmp_beside",
    "move_into_place",
    "umask_mode",
]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX = "model.safetensors.index.json"
TMP_MARK = ".metanet-tmp-"


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied (what ``open`` would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or a byte count → bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {
        "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
        "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1,
    }  # fmt: skip
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(
            f"size {text!r}: expected a number with an optional unit (2GB, 500MB)"
        ) from None
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * factor)


def _short(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (headers are attacker-sized)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header and where the data starts, validated as safetensors validates it
    (so nothing is read that safetensors would refuse, and no read reaches past the file):
    a JSON object; ``__metadata__`` a string-to-string map; every tensor a known dtype, a
    shape of non-negative integers and ``data_offsets`` ``[begin, end]`` that hold exactly
    its bytes; the tensors, in offset order, cover the data section exactly, each starting
    where the one before ends (no gap, no overlap). A :class:`CheckpointError` names the
    file and the tensor otherwise."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below forever
        raise CheckpointError(f"{path}: not a regular file")
    size = st.st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (or truncated: bad header)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, a 5,000-digit integer
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and (
        not isinstance(meta, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        name = _short(key)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(
                f"{path}: tensor {name}: expected dtype, shape and data_offsets, got {_short(info)}"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {_short(dtype)}")
        if (
            not isinstance(shape, list)
            or len(shape) > 64
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
            )
        ):
            raise CheckpointError(f"{path}: tensor {name} has a bad shape {_short(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{path}: tensor {name} has bad data_offsets {_short(offsets)}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes or (0 in shape and any(d >= 2**31 for d in shape)):
            raise CheckpointError(
                f"{path}: tensor {name}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                f"bytes, its {dtype} shape {shape} needs {nbytes}"
            )
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap"
            raise CheckpointError(
                f"{path}: tensor {_short(key)} {what} (data_offsets {begin}..{end})"
            )
        expected = end
    if 8 + n + expected != size:
        if 8 + n + expected > size:
            raise CheckpointError(
                f"{path}: truncated ({size} bytes, its header promises {8 + n + expected}); "
                "was it written completely?"
            )
        raise CheckpointError(
            f"{path}: {size - 8 - n - expected} bytes after the last tensor (not a safetensors file)"
        )
    return header, 8 + n


def read_index(folder: Path) -> dict[str, str] | None:
    """A folder's ``model.safetensors.index.json`` weight map (tensor -> file), checked,
    or None when the folder has no index.

    Every file it names must be a plain name in the folder itself: an entry such as
    ``../other/model.safetensors`` or ``/etc/passwd`` would make a merge read (and write
    into its output) what lies outside the input. A malformed index is a
    :class:`CheckpointError` naming the file.
    """
    index = Path(folder) / INDEX
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{index}: not valid JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: expected {{'weight_map': {{tensor: file, ...}}}}")
    for tensor, fname in weight_map.items():
        if fname in ("", ".", "..") or Path(fname).name != fname or "\\" in fname:
            raise CheckpointError(
                f"{index}: tensor {tensor!r} names {fname!r}, which is not a file of this "
                "folder; index entries must stay inside their folder"
            )
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those its index names, or every ``*.safetensors``."""
    weight_map = read_index(folder)
    if weight_map is not None:
        return [folder / n for n in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


class LazyWeights(Mapping):
    """Tensors of safetensors files, read on access.

    Args:
        path: a ``.safetensors`` file or a folder of them.
        names: optional ``{our name: name in the file}`` (e.g. a model's state-dict keys
            against a checkpoint saved without the base-model prefix); default identity.
        upcast: read float16/bfloat16 tensors as this dtype (e.g. float32 for matching);
            wider ones are returned as stored. :meth:`read` always gives the stored dtype.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        names: Mapping[str, str] | None = None,
        upcast: torch.dtype | None = None,
    ):
        self.path = Path(path)
        weight_map = read_index(self.path) if self.path.is_dir() else None
        files = weight_files(self.path) if self.path.is_dir() else [self.path]
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files")
        self.files = files
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        self.metadata: dict[str, str] = {}
        self.order: list[tuple[Path, list[str]]] = []
        for file in files:
            header, start = _header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
            for key in keys:
                self.entries[key] = (file, start, header[key])
            self.order.append((file, keys))
        for tensor, fname in (weight_map or {}).items():
            # a stale or hand-edited index: loaders would miss the tensor, a merge drop it
            if tensor not in self.entries or self.entries[tensor][0].name != fname:
                raise CheckpointError(
                    f"{self.path / INDEX}: puts tensor {tensor!r} in {fname}, which does not "
                    "hold it"
                )
        self.names = dict(names) if names is not None else {k: k for k in self.entries}
        missing = [k for k, v in self.names.items() if v not in self.entries]
        if missing:
            raise KeyError(f"{self.path}: no tensor {self.names[missing[0]]!r}")
        self.upcast = upcast

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        t = self.read(self.names[name])
        if self.upcast is not None and t.is_floating_point() and t.element_size() < 4:
            t = t.to(self.upcast)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    # ------------------------------------------------------------------ metadata
    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        _, _, info = self.entries[self.names[name]]
        return tuple(info["shape"]), _DTYPES[info["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name)[0]

    @property
    def nbytes(self) -> int:
        return sum(e[2]["data_offsets"][1] - e[2]["data_offsets"][0] for e in self.entries.values())

    def read(self, key: str) -> Tensor:
        """Tensor ``key`` as stored in the file (a fresh tensor, nothing mapped)."""
        file, start, info = self.entries[key]
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        raw = torch.empty(hi - lo, dtype=torch.uint8)
        with open(file, "rb") as f:
            f.seek(start + lo)
            view = memoryview(raw.numpy())
            got = 0
            while got < hi - lo:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{file}: tensor {key!r} is truncated")
                got += n
        return raw.view(_DTYPES[info["dtype"]]).reshape(shape)


class ShardWriter:
    """Write tensors one at a time into ``folder`` (or one file), in shards of at most
    ``max_shard`` bytes (a tensor larger than that gets a shard of its own).

    Each shard is written under a temporary name (``TMP_MARK`` in it) with its header
    first (the shapes are declared up front with :meth:`plan`) and renamed when full;
    :meth:`close` writes the index. Use it through :func:`write_tensors`.
    """

    def __init__(
        self,
        target: Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard: int | None = None,
        single_file: bool = False,
        metadata: Mapping[str, str] | None = None,
        base_name: str = "model",
    ):
        self.target = Path(target)
        self.metadata = dict(metadata or {"format": "pt"})
        self.single = single_file
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not single_file and max_shard and shards[-1] and size + n > max_shard:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, n))
            size += n
        self.shards = shards
        k = len(shards)
        if single_file:
            self.files = [self.target]
        elif k == 1:
            self.files = [self.target / f"{base_name}.safetensors"]
        else:
            self.files = [
                self.target / f"{base_name}-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)
            ]
        self._where = {e[0]: (i, j) for i, s in enumerate(shards) for j, e in enumerate(s)}
        self._shard = -1
        self._next = 0
        self._f = None
        self._tmp: Path | None = None
        self.written: list[Path] = []

    def _open(self, i: int) -> None:
        shard = self.shards[i]
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name, shape, dtype, n in shard:
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}  # fmt: skip
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        final = self.files[i]
        self._tmp = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._shard, self._next = i, 0

    def _finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.files[self._shard])
        self.written.append(self.files[self._shard])
        self._tmp = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Tensors must come in plan order."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not in the write plan")
        i, j = self._where[name]
        _, shape, dtype, n = self.shards[i][j]
        if i != self._shard:
            if self._f is not None:
                raise RuntimeError(f"shard {self._shard} is not complete before {name!r}")
            self._open(i)
        if j != self._next:
            raise RuntimeError(f"tensor {name!r} written out of order")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {shape} {dtype}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._next += 1
        if self._next == len(self.shards[i]):
            self._finish()

    def close(self) -> None:
        if self._f is not None or len(self.written) != len(self.files):
            raise RuntimeError("not every planned tensor was written")
        if not self.single and len(self.files) > 1:
            weight_map = {e[0]: self.files[i].name for i, s in enumerate(self.shards) for e in s}
            total = sum(e[3] for s in self.shards for e in s)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            tmp = self.target / f".{INDEX}{TMP_MARK}{os.getpid()}"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.target / INDEX)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_beside(out: Path) -> Path:
    """The temporary name an output is written under, beside it (this process's)."""
    return out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``; an old ``out`` (file or folder) is moved
    aside first and removed only once the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}-old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        os.replace(tmp, out)


def remove_stale(target: Path) -> list[Path]:
    """Remove temporary files/folders an interrupted metanet write of ``target`` left
    beside it (or inside it): those whose writing process is gone. Returns them."""
    import shutil

    target = Path(target)
    removed = []
    places = [target.parent] + ([target] if target.is_dir() else [])
    for place in places:
        if not place.is_dir():
            continue
        for p in place.iterdir():
            if TMP_MARK not in p.name:
                continue
            if place == target.parent and not p.name.startswith(f".{target.name}"):
                continue
            tail = p.name.rsplit(TMP_MARK, 1)[1]
            pid = tail.split("-")[0]
            if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def iter_in_file_order(weights: LazyWeights) -> Iterable[tuple[Path, list[str]]]:
    """``(file, keys in storage order)`` for every file: reading in this order is sequential."""
    return weights.order
