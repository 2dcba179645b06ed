"""The field's weight datasets, imported from their published layouts.

Every weight-space paper reports on the same few datasets. Each ``import_*`` function
reads one of them in the layout its authors publish and writes a metanet weight dataset
(``dataset.json``, ``space.json`` and safetensors shards, see :mod:`tasks.datasets.inr`), so
:class:`tasks.datasets.inr.WeightDataset` and ``metanet train`` read it unchanged:

* :func:`import_dwsnets_mnist` / :func:`import_dwsnets_fmnist` — the MNIST and
  Fashion-MNIST INRs of DWSNets (Navon et al. 2023), also read by NFN, NG-GNN/NG-T and
  ScaleGMN: one ``.pth`` state dict per INR, SIREN 2→32→32→1 (``seq.{0,1,2}``);
* :func:`import_nfn_sirens` — NFN's SIREN datasets (Zhou et al. 2023; CIFAR-10, MNIST,
  Fashion-MNIST): ``{prefix}_{label}s/net{index}.pth``, split by index;
* :func:`import_small_cnn_zoo` — the Small CNN Zoo (Unterthiner et al. 2020: CIFAR10-GS,
  SVHN-GS, MNIST-GS, FashionMNIST-GS): ``weights.npy``, ``metrics.csv[.gz]``,
  ``layout.csv``, with NFN's split protocol.

INR weights are renamed to metanet's SIREN names (``net.0``, ``net.2``, ``net.4``: the
tensors of :class:`tasks.datasets.inr.Siren`) and ``dataset.json["config"]`` holds the
:class:`tasks.datasets.inr.INRConfig` of their forward pass, so :func:`tasks.datasets.inr.siren_forward`
renders them; the published names are kept in ``dataset.json["source_names"]``. Values
are copied bit for bit; only the CNN zoo's TensorFlow kernels are transposed into
PyTorch's layout. Inputs are only read; shards are written atomically, one at a time (a
set is never held in memory twice), and a rerun skips finished shards.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.io import CheckpointError, atomic_write
from metanet.space import WeightSpace
from tasks.datasets.inr import (
    XY,
    INRConfig,
    _save_shard,
    _shard_path,
    _write_json,
    check_dataset_folder,
    removed_if_refused,
)

__all__ = [
    "import_dwsnets_mnist",
    "import_dwsnets_fmnist",
    "import_nfn_sirens",
    "import_small_cnn_zoo",
    "small_cnn_zoo_model",
    "import_dataset",
    "IMPORTERS",
]

NAN = float("nan")


# --------------------------------------------------------------------------- writing
@dataclass
class _Item:
    """One network to import: where its weights are and its index row (label, split...)."""

    source: Path | int
    row: dict = field(default_factory=dict)


def _check_destination(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise CheckpointError(
            f"{dst}: the output folder is inside the input {src}; pass a folder outside it "
            "(inputs are never written to)"
        )


def _write(
    dst: Path,
    meta: dict,
    space: WeightSpace,
    items: Sequence[_Item],
    load: Callable[[Sequence[_Item], Callable[[int], object]], dict[str, Tensor]],
    shard_size: int,
    progress: bool,
    what: str,
) -> list[Path]:
    """Write ``items`` as shards of ``shard_size``: ``load(chunk, advance)`` gives the chunk's
    stacked tensors (and may fill its rows), calling ``advance(k)`` as it reads ``k`` more
    items (the progress bar). Finished shards are kept (resume)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if not items:
        raise CheckpointError(f"{meta['source']['path']}: no {what} found to import")
    with removed_if_refused(dst):
        num_shards = math.ceil(len(items) / shard_size)
        meta = {**meta, "num_shards": num_shards, "shard_size": shard_size, "count": len(items)}
        check_dataset_folder(dst)
        dst.mkdir(parents=True, exist_ok=True)
        _write_json(dst / "dataset.json", meta, check_same=True)
        space_path = dst / "space.json"
        if not space_path.exists():
            atomic_write(space_path, lambda tmp: Path(tmp).write_text(space.to_json(2)))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"importing {what}", unit=what)
        advance = bar.update if bar is not None else lambda k: None
        paths = []
        for i in range(num_shards):
            path = _shard_path(dst, i, num_shards)
            paths.append(path)
            chunk = items[i * shard_size : (i + 1) * shard_size]
            if path.exists():  # finished by an earlier run
                advance(len(chunk))
                continue
            tensors = {n: t.contiguous() for n, t in load(chunk, advance).items()}
            _save_shard(path, tensors, [it.row for it in chunk])
        if bar is not None:
            bar.close()
        return paths


def _split_counts(items: Sequence[_Item]) -> dict[str, int]:
    return {s: sum(it.row["split"] == s for it in items) for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- SIREN INRs
def _read_state_dict(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file at fault
        raise CheckpointError(f"{path}: not a readable state dict ({e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, expected a state dict")
    return sd


def _siren_layers(path: Path, sd: dict) -> list[tuple[str, str]]:
    """The (weight key, bias key) of each Linear layer, in order; checks the chain."""
    keys = [k for k in sd if k != "label"]
    if len(keys) % 2 or not keys:
        raise CheckpointError(f"{path}: expected (weight, bias) pairs, got keys {keys}")
    pairs = list(zip(keys[::2], keys[1::2]))
    prev = None
    for w, b in pairs:
        if not (w.endswith("weight") and b.endswith("bias")):
            raise CheckpointError(f"{path}: keys {w!r}, {b!r} are not a (weight, bias) pair")
        tw, tb = sd[w], sd[b]
        if not (isinstance(tw, Tensor) and tw.dim() == 2 and isinstance(tb, Tensor)):
            raise CheckpointError(f"{path}: {w!r} is not a 2-D tensor (a Linear weight)")
        if tuple(tb.shape) != (tw.shape[0],):
            raise CheckpointError(
                f"{path}: {b!r} has shape {tuple(tb.shape)}, {w!r} has {tw.shape[0]} outputs"
            )
        if prev is not None and tw.shape[1] != prev:
            raise CheckpointError(f"{path}: {w!r} takes {tw.shape[1]} inputs, not {prev}")
        prev = tw.shape[0]
    return pairs


def _siren_config(path: Path, sd: dict, pairs: list[tuple[str, str]], **kw) -> INRConfig:
    sizes = [sd[pairs[0][0]].shape[1]] + [sd[w].shape[0] for w, _ in pairs]
    hidden = sizes[1:-1]
    if not hidden or len(set(hidden)) != 1:
        raise CheckpointError(
            f"{path}: layer widths {sizes}; metanet's SIREN has equal hidden widths"
        )
    return INRConfig(
        in_features=sizes[0], hidden=hidden[0], depth=len(hidden), out_features=sizes[-1], **kw
    )


class _SirenReader:
    """Reads per-INR state dict files into metanet's SIREN tensors, checking each file
    against the first (same keys, same shapes)."""

    def __init__(self, first: Path, cfg_kwargs: dict):
        sd = _read_state_dict(first)
        self.pairs = _siren_layers(first, sd)
        self.cfg = _siren_config(first, sd, self.pairs, **cfg_kwargs)
        names = self.cfg.names()
        self.source_names = {
            ours: theirs for ours, theirs in zip(names, [k for p in self.pairs for k in p])
        }
        self.shapes = {k: tuple(sd[k].shape) for p in self.pairs for k in p}

    def space(self) -> WeightSpace:
        from tasks.datasets.inr import siren_space

        return siren_space(self.cfg)

    def read(self, path: Path) -> tuple[dict[str, Tensor], object]:
        """``({metanet name: tensor}, the file's "label" entry or None)``."""
        sd = _read_state_dict(path)
        out = {}
        for ours, theirs in self.source_names.items():
            t = sd.get(theirs)
            if not isinstance(t, Tensor):
                raise CheckpointError(
                    f"{path}: no tensor {theirs!r} (the dataset's other files have it)"
                )
            if tuple(t.shape) != self.shapes[theirs]:
                raise CheckpointError(
                    f"{path}: {theirs!r} has shape {tuple(t.shape)}, "
                    f"the dataset's other files {self.shapes[theirs]}"
                )
            out[ours] = t
        extra = set(sd) - set(self.source_names.values()) - {"label"}
        if extra:
            raise CheckpointError(f"{path}: unexpected entries {sorted(extra)}")
        return out, sd.get("label")

    def load(
        self,
        chunk: Sequence[_Item],
        advance: Callable[[int], object],
        label_from_file: bool = False,
    ) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {n: [] for n in self.source_names}
        for it in chunk:
            w, label = self.read(it.source)
            if label_from_file:
                it.row["label"] = _label(it.source, label, it.row.get("label"))
            for n, t in w.items():
                parts[n].append(t.float())
            advance(1)
        return {n: torch.stack(v) for n, v in parts.items()}


def _label(path: Path, value, expected: int | None) -> int:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{path}: 'label' is {value!r}, expected a class index")
    if expected is not None and value != expected:
        raise CheckpointError(
            f"{path}: 'label' {value} disagrees with the splits file ({expected})"
        )
    return value


def _inr_meta(kind: str, src: Path, reader: _SirenReader, resolution: int, **extra) -> dict:
    return {
        "kind": kind,
        "source": {"path": str(src.resolve()), **extra},
        "config": asdict(reader.cfg),
        "resolution": resolution,
        "source_names": reader.source_names,
    }


def _read_splits(path: Path) -> dict[str, tuple[list[str], list | None]]:
    """A splits json: ``{split: {"path": [...], "label": [...]}}`` (DWSNets'
    ``generate_data_splits.py``, neural-graphs) or ``{split: [paths]}`` (DWSNets'
    Fashion-MNIST ``splits.json``) -> ``{split: (paths, labels or None)}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable splits json ({e})") from None
    out = {}
    for split in ("train", "val", "test"):
        entry = data.get(split) if isinstance(data, dict) else None
        if isinstance(entry, list):
            out[split] = ([str(p) for p in entry], None)
        elif isinstance(entry, dict) and isinstance(entry.get("path"), list):
            labels = entry.get("label")
            if labels is not None and len(labels) != len(entry["path"]):
                raise CheckpointError(
                    f"{path}: split {split!r} has {len(entry['path'])} paths "
                    f"but {len(labels)} labels"
                )
            out[split] = ([str(p) for p in entry["path"]], labels)
        else:
            raise CheckpointError(
                f"{path}: no {split!r} split (expected a list of paths or "
                '{"path": [...], "label": [...]})'
            )
    return out


_MNIST_DIR = re.compile(r"^mnist_png_(training|testing)_(\d)_(\d+)$")


def import_dwsnets_mnist(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    splits: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    shard_size: int = 10_000,
    progress: bool = True,
) -> list[Path]:
    """Import DWSNets' MNIST INRs (the ``mnist-inrs`` folder of their data release).

    Layout read: ``SRC/mnist_png_{training|testing}_{label}_{image}/**/*.pth`` (in the
    release ``.../checkpoints/model_final.pth``), each a state dict
    ``seq.{0,1,2}.{weight,bias}`` of their INR: ``sin(30·(W x + b))`` twice, a Linear,
    ``+ 0.5``, on coordinates in ``[-1, 1]²`` (28×28). ``splits``: the
    ``mnist_splits.json`` of their ``generate_data_splits.py`` (``{split: {"path",
    "label"}}``; entries matched from their ``mnist_png_*`` component on, labels checked);
    without it, the testing INRs are the test split and ``val_size`` training INRs, drawn
    with ``seed``, the validation split, as that script does (it draws them unseeded).
    Returns the shard paths.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    found: dict[str, tuple[str, int, int]] = {}
    for p in sorted(src.glob("mnist_png_*/**/*.pth")):
        rel = p.relative_to(src)
        m = _MNIST_DIR.match(rel.parts[0])
        if m is None:
            raise CheckpointError(
                f"{src / rel.parts[0]}: expected mnist_png_{{training|testing}}_LABEL_IMAGE"
            )
        found[rel.as_posix()] = (m.group(1), int(m.group(2)), int(m.group(3)))
    if not found:
        hint = " (pass SRC/mnist-inrs)" if (src / "mnist-inrs").is_dir() else ""
        raise CheckpointError(f"{src}: no mnist_png_*/**/*.pth INR files{hint}")
    if splits is not None:
        assigned, seen = [], set()
        for split, (paths, labels) in _read_splits(Path(splits)).items():
            for k, p in enumerate(paths):
                parts = Path(p).parts
                starts = [i for i, q in enumerate(parts) if q.startswith("mnist_png_")]
                rel = "/".join(parts[starts[-1] :]) if starts else p
                if rel not in found:
                    raise CheckpointError(f"{splits}: {p} (split {split!r}) is not under {src}")
                if labels is not None and int(labels[k]) != found[rel][1]:
                    raise CheckpointError(
                        f"{splits}: {p} has label {labels[k]} but its folder says {found[rel][1]}"
                    )
                if rel in seen:
                    raise CheckpointError(f"{splits}: {p} is listed twice")
                seen.add(rel)
                assigned.append((rel, split))
    else:
        train = [r for r, (s, _, _) in found.items() if s == "training"]
        if val_size > len(train):
            raise CheckpointError(
                f"{src}: {len(train)} training INRs, fewer than the {val_size} to hold out "
                "for validation; pass a smaller val_size (--val-size) or the release's splits"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        val = {train[i] for i in order[:val_size].tolist()}
        assigned = [
            (r, "test" if s == "testing" else "val" if r in val else "train")
            for r, (s, _, _) in found.items()
        ]
    items = [
        _Item(
            src / rel,
            {
                "split": split,
                "label": found[rel][1],
                "image": found[rel][2],
                "source": rel,
                "psnr": NAN,
            },
        )
        for rel, split in assigned
    ]
    reader = _SirenReader(items[0].source, {"variant": "dws", "w0": 30.0})
    meta = _inr_meta(
        "dwsnets-mnist",
        src,
        reader,
        28,
        splits=str(Path(splits).resolve()) if splits else None,
        val_size=None if splits else val_size,
        seed=None if splits else seed,
        coordinates=XY,
    )
    meta["splits"] = _split_counts(items)
    return _write(dst, meta, reader.space(), items, reader.load, shard_size, progress, "INRs")


def import_dwsnets_fmnist(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    splits: str | os.PathLike | None = None,
    shard_size: int = 10_000,
    progress: bool = True,
) -> list[Path]:
    """Import DWSNets' Fashion-MNIST INRs (the ``fmnist_inrs`` folder of their release).

    Layout read: ``SRC/splits.json`` (``{"train": [paths], "val": [...], "test":
    [...]}``, each path ending ``{split}/model_{image}.pth``) and those files: state dicts
    ``seq.{0,1,2}.{weight,bias}`` (DWSNets' INR, as for MNIST) plus a ``"label"`` entry.
    Each path is resolved from its last two parts under ``SRC``, as neural-graphs'
    ``preprocess_fmnist.py`` does. ``splits`` overrides ``SRC/splits.json`` (also in the
    ``{split: {"path", "label"}}`` form of neural-graphs' ``fmnist_splits.json``, whose
    labels are then checked against the files'). Returns the shard paths.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    splits_path = Path(splits) if splits is not None else src / "splits.json"
    if not splits_path.exists():
        raise CheckpointError(f"{splits_path}: missing (the release's fmnist_inrs/splits.json)")
    items = []
    for split, (paths, labels) in _read_splits(splits_path).items():
        for k, p in enumerate(paths):
            rel = Path(*Path(p).parts[-2:])
            m = re.match(r"^model_(\d+)\.pth$", rel.name)
            if not (src / rel).is_file():
                raise CheckpointError(
                    f"{splits_path}: {p} (split {split!r}) not found as {src / rel}"
                )
            row = {
                "split": split,
                "label": None if labels is None else int(labels[k]),
                "image": int(m.group(1)) if m else None,
                "source": rel.as_posix(),
                "psnr": NAN,
            }
            items.append(_Item(src / rel, row))
    if not items:
        raise CheckpointError(f"{splits_path}: lists no INR files")
    reader = _SirenReader(items[0].source, {"variant": "dws", "w0": 30.0})
    meta = _inr_meta(
        "dwsnets-fmnist",
        src,
        reader,
        28,
        splits=str(splits_path.resolve()),
        coordinates=XY,
    )
    meta["splits"] = _split_counts(items)

    def load(chunk: Sequence[_Item], advance: Callable[[int], object]) -> dict[str, Tensor]:
        return reader.load(chunk, advance, label_from_file=True)

    return _write(dst, meta, reader.space(), items, load, shard_size, progress, "INRs")


def import_nfn_sirens(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    prefix: str = "randinit_smaller",
    split_points: tuple[int, int] = (45_000, 50_000),
    augmentations: int = 0,
    resolution: int | None = None,
    shard_size: int = 10_000,
    progress: bool = True,
) -> list[Path]:
    """Import one of NFN's SIREN datasets (``siren_cifar_wts``, ``siren_mnist_wts``,
    ``siren_fashion_wts``).

    Layout read: ``SRC/{prefix}_{label}s/net{index}.pth``, index ``i`` being image ``i`` of
    the dataset's train and test sets concatenated; state dicts of NFN's ``Siren``
    (``net.{0,1}.linear.*``, ``net.2.*``: ``sin(30·(W x + b))`` twice, then a Linear, no
    offset; CIFAR-10 2→32→32→3, the others →1; pixels in ``[-1, 1]``, coordinates
    ``[-1, 1]²`` in (row, column) order). Split as NFN's experiments do: index below
    ``split_points[0]`` train, below ``split_points[1]`` val, the rest test.
    ``augmentations=k`` adds the training INRs of ``{prefix}_aug0`` ... ``aug{k-1}`` (NFN's
    ``extra_aug``; other fits of the training images) to the train split. ``resolution``
    (the images' side, for rendering) defaults to 32 for 3 channels, else 28. Returns the
    shard paths.
    """
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    val_point, test_point = split_points
    if not 0 <= val_point <= test_point:
        raise ValueError(f"split_points must be 0 <= val <= test, got {split_points}")
    items: list[_Item] = []
    for copy in [None, *range(augmentations)]:
        tag = prefix if copy is None else f"{prefix}_aug{copy}"
        dir_re = re.compile(rf"^{re.escape(tag)}_(\d)s$")
        dirs = sorted(d for d in src.glob(f"{tag}_*s") if d.is_dir() and dir_re.match(d.name))
        if not dirs:
            raise CheckpointError(f"{src}: no {tag}_<label>s folders (NFN's layout)")
        by_index: dict[int, _Item] = {}
        for d in dirs:
            label = int(dir_re.match(d.name).group(1))
            for p in d.glob("*.pth"):
                m = re.match(r"^net(\d+)\.pth$", p.name)
                if m is None:
                    raise CheckpointError(f"{p}: expected net<index>.pth")
                idx = int(m.group(1))
                if idx in by_index:
                    raise CheckpointError(f"{p}: index {idx} also in {by_index[idx].source}")
                split = "train" if idx < val_point else "val" if idx < test_point else "test"
                row = {
                    "split": split,
                    "label": label,
                    "image": idx,
                    "copy": copy,
                    "source": p.relative_to(src).as_posix(),
                    "psnr": NAN,
                }
                by_index[idx] = _Item(p, row)
        if copy is None:
            missing = sorted(set(range(len(by_index))) - set(by_index))
            if missing:
                raise CheckpointError(
                    f"{src}/{prefix}_*s: indices are not 0..{len(by_index) - 1} "
                    f"(missing {missing[:5]}); NFN's split points assume they are"
                )
        items += [
            by_index[i]
            for i in sorted(by_index)
            if copy is None or by_index[i].row["split"] == "train"
        ]
    reader = _SirenReader(items[0].source, {"variant": "siren", "w0": 30.0, "target_psnr": None})
    res = resolution or (32 if reader.cfg.out_features == 3 else 28)
    meta = _inr_meta(
        "nfn-siren",
        src,
        reader,
        res,
        prefix=prefix,
        split_points=list(split_points),
        augmentations=augmentations,
        pixels="[-1, 1] ((x - 0.5) / 0.5)",
    )
    meta["splits"] = _split_counts(items)
    return _write(dst, meta, reader.space(), items, reader.load, shard_size, progress, "INRs")


# --------------------------------------------------------------------------- Small CNN Zoo
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "elu": nn.ELU,
    "linear": nn.Identity,
}


def small_cnn_zoo_model(
    activation: str = "relu",
    in_channels: int = 1,
    width: int = 16,
    layers: int = 3,
    classes: int = 10,
) -> nn.Sequential:
    """The Small CNN Zoo's network (their ``build_cnn``) as a PyTorch module: ``layers``
    3×3 stride-2 unpadded convolutions of ``width`` channels, each followed by
    ``activation``, global average pooling, a Linear to ``classes``; inputs are
    grayscale images in ``[-1, 1]``, NCHW. Its ``state_dict`` names are the imported
    dataset's tensors (4,970 parameters by default). Dropout, used by some of the zoo's
    networks in training, is the identity at test time and is left out."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [
            nn.Conv2d(in_channels if i == 0 else width, width, 3, stride=2),
            _ACTIVATIONS[activation](),
        ]
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*mods)


@dataclass(frozen=True)
class _Var:
    varname: str
    start: int
    end: int
    shape: tuple[int, ...]


def _read_layout(path: Path, width: int) -> list[tuple[str, _Var, _Var]]:
    """``layout.csv`` -> ``[(layer, kernel var, bias var)]`` in layer order."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    need = {"varname", "start_idx", "end_idx", "shape"}
    if not rows or not need <= set(rows[0]):
        have = sorted(rows[0]) if rows else []
        raise CheckpointError(f"{path}: needs columns {sorted(need)}, has {have}")
    layers: dict[str, dict[str, _Var]] = {}
    covered = torch.zeros(width, dtype=torch.bool)
    for k, r in enumerate(rows, start=2):  # line 1 is the header
        name = r["varname"]
        try:
            shape = tuple(int(s) for s in ast.literal_eval(r["shape"]))
            var = _Var(name, int(r["start_idx"]), int(r["end_idx"]), shape)
        except (ValueError, SyntaxError, TypeError):
            raise CheckpointError(
                f"{path}, line {k}: unreadable start_idx/end_idx/shape {r}"
            ) from None
        if var.end - var.start != math.prod(shape) or not 0 <= var.start < var.end <= width:
            raise CheckpointError(
                f"{path}, line {k} ({name}): columns {var.start}:{var.end} do not hold shape "
                f"{shape} inside the {width} columns of weights.npy"
            )
        if covered[var.start : var.end].any():
            raise CheckpointError(f"{path}, line {k} ({name}): columns overlap another variable")
        covered[var.start : var.end] = True
        layer, _, leaf = name.rpartition("/")
        role = {"kernel:0": "kernel", "bias:0": "bias"}.get(leaf)
        if role is None:
            raise CheckpointError(
                f"{path}, line {k}: varname {name!r} is neither kernel:0 nor bias:0"
            )
        layers.setdefault(layer, {})[role] = var
    if not covered.all():
        raise CheckpointError(
            f"{path}: columns {torch.nonzero(~covered)[:5, 0].tolist()}... of weights.npy "
            "belong to no variable"
        )
    out = []
    for layer, v in layers.items():
        if set(v) != {"kernel", "bias"}:
            raise CheckpointError(
                f"{path}: layer {layer!r} lacks a {'bias' if 'kernel' in v else 'kernel'}"
            )
        out.append((layer, v["kernel"], v["bias"]))
    return out


def _torch_names(path: Path, layout: list[tuple[str, _Var, _Var]]) -> list[tuple[str, _Var, _Var]]:
    """Name each layer as :func:`small_cnn_zoo_model` does and check the chain."""
    convs = [entry for entry in layout if len(entry[1].shape) == 4]
    dense = [entry for entry in layout if len(entry[1].shape) == 2]
    if not convs or len(dense) != 1 or layout != convs + dense:
        raise CheckpointError(
            f"{path}: expected conv kernels (4-D) then one dense kernel (2-D), got "
            f"{[(e[0], e[1].shape) for e in layout]}"
        )
    prev = None
    for layer, k, b in layout:
        fan_in, fan_out = k.shape[-2], k.shape[-1]
        if (prev is not None and fan_in != prev) or b.shape != (fan_out,):
            raise CheckpointError(
                f"{path}: layer {layer!r} (kernel {k.shape}, bias {b.shape}) does not follow "
                f"a layer of {prev} channels"
            )
        prev = fan_out
    named = [(str(2 * i), k, b) for i, (_, k, b) in enumerate(convs)]
    named.append((str(2 * len(convs) + 2), dense[0][1], dense[0][2]))
    return named


def _open_metrics(src: Path) -> tuple[Path, Callable[[], Iterator[dict]]]:
    for name in ("metrics.csv.gz", "metrics.csv"):
        path = src / name
        if path.exists():

            def rows(path: Path = path) -> Iterator[dict]:
                opener = gzip.open if path.suffix == ".gz" else open
                with opener(path, "rt", newline="") as f:
                    yield from csv.DictReader(f)

            return path, rows
    raise CheckpointError(f"{src}: no metrics.csv.gz or metrics.csv (the zoo's annotations)")


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def import_small_cnn_zoo(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    order: str | os.PathLike | None = None,
    step: int | None = None,
    activation: str | None = None,
    seed: int = 0,
    shard_size: int = 5_000,
    progress: bool = True,
) -> list[Path]:
    """Import one dataset of the Small CNN Zoo (CIFAR10-GS, SVHN-GS, MNIST-GS,
    FashionMNIST-GS: the folder its ``.tar.xz`` extracts to).

    Layout read: ``SRC/weights.npy`` (one flat float32 vector per checkpoint, memory-mapped,
    never loaded whole), ``SRC/metrics.csv.gz`` (or ``metrics.csv``; a row per checkpoint:
    ``step``, ``test_accuracy``, ``config.activation``, ...) and ``SRC/layout.csv``
    (``varname``, ``start_idx``, ``end_idx``, ``shape``: where each TensorFlow variable
    lies in the vector). Kernels become PyTorch's layout (conv ``(kh, kw, in, out)`` →
    ``(out, in, kh, kw)``, dense ``(in, out)`` → ``(out, in)``) under
    :func:`small_cnn_zoo_model`'s names.

    The split is NFN's (``predict_gen``; also neural-graphs' and ScaleGMN's): checkpoints
    reordered by ``order`` (their ``{dataset}_split.csv``, one row index per line; without
    it, a permutation drawn with ``seed``), those at ``step`` kept (default: the last step,
    86 in the release), the second half test, the first half shuffled by
    ``random.Random(0)`` and cut 80/20 into train/val. ``activation`` keeps only networks
    with that ``config.activation`` (after the split, as ScaleGMN does). Each row records
    ``accuracy`` (test accuracy, the regression target of ``metanet train --target
    accuracy``), ``label`` (its decile), the losses and the ``config.*`` columns. Returns
    the shard paths.
    """
    import numpy as np

    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    wpath = src / "weights.npy"
    try:
        weights = np.load(wpath, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{wpath}: not a readable .npy file ({e})") from None
    if weights.ndim != 2:
        raise CheckpointError(f"{wpath}: shape {weights.shape}, expected (checkpoints, values)")
    n, width = weights.shape
    named = _torch_names(src / "layout.csv", _read_layout(src / "layout.csv", width))
    mpath, metric_rows = _open_metrics(src)

    steps = []
    for k, r in enumerate(metric_rows()):
        for col in ("step", "test_accuracy"):
            if col not in r:
                raise CheckpointError(f"{mpath}: no {col!r} column (columns: {sorted(r)})")
        try:
            steps.append(int(float(r["step"])))
        except ValueError:
            raise CheckpointError(
                f"{mpath}, row {k + 1}: step {r['step']!r} is not a number"
            ) from None
    if len(steps) != n:
        raise CheckpointError(f"{mpath}: {len(steps)} rows, but {wpath} has {n} checkpoints")
    if order is not None:
        try:
            perm = [int(line) for line in Path(order).read_text().split()]
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{order}: not a list of row indices ({e})") from None
        if sorted(perm) != list(range(n)):
            raise CheckpointError(
                f"{order}: not a permutation of the {n} rows of {wpath} ({len(perm)} entries)"
            )
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    step = max(steps) if step is None else step
    final = [i for i in perm if steps[i] == step]  # rows of weights.npy, in NFN's order
    if not final:
        raise CheckpointError(
            f"{mpath}: no checkpoint at step {step} (steps: {sorted(set(steps))})"
        )
    test_point = int(0.5 * len(final))
    trainval = list(range(test_point))
    random.Random(0).shuffle(trainval)
    val_point = int(0.8 * len(trainval))
    split_of = {k: "train" for k in trainval[:val_point]}
    split_of.update({k: "val" for k in trainval[val_point:]})

    wanted = {row: k for k, row in enumerate(final)}
    rows: list[dict | None] = [None] * len(final)
    for i, r in enumerate(metric_rows()):
        k = wanted.get(i)
        if k is None:
            continue
        acc = float(r["test_accuracy"])
        row = {col.removeprefix("config."): _number(v) for col, v in r.items() if col}
        del row["test_accuracy"]  # kept as "accuracy", the target train() reads
        row.update(
            model=i,
            split=split_of.get(k, "test"),
            accuracy=acc,
            label=min(9, max(0, int(acc * 10))),
        )
        rows[k] = row
    keep = [
        k
        for k in range(len(final))
        if activation is None or rows[k].get("activation") == activation
    ]
    items = [_Item(final[k], rows[k]) for k in keep]
    if not items:
        raise CheckpointError(f"{mpath}: no network with config.activation {activation!r}")

    acts = {it.row.get("activation") for it in items}
    space = _zoo_space(named, acts)

    def load(chunk: Sequence[_Item], advance: Callable[[int], object]) -> dict[str, Tensor]:
        idx = np.array([it.source for it in chunk])
        order_ = np.argsort(idx)
        block = np.empty((len(idx), width), dtype=np.float32)
        block[order_] = weights[idx[order_]]  # sorted reads from the memory map
        if not np.isfinite(block).all():
            bad = [int(i) for i, ok in zip(idx, np.isfinite(block).all(1)) if not ok]
            raise CheckpointError(f"{wpath}: rows {bad[:5]} hold non-finite weights")
        flat = torch.from_numpy(block)
        out = {}
        for name, k, b in named:
            kern = flat[:, k.start : k.end].reshape(len(idx), *k.shape)
            out[f"{name}.weight"] = kern.permute(0, 4, 3, 1, 2) if kern.dim() == 5 else kern.mT
            out[f"{name}.bias"] = flat[:, b.start : b.end].reshape(len(idx), *b.shape)
        advance(len(chunk))
        return out

    meta = {
        "kind": "small-cnn-zoo",
        "source": {
            "path": str(src.resolve()),
            "order": str(Path(order).resolve()) if order else None,
            "seed": None if order else seed,
            "step": step,
            "activation": activation,
        },
        "architecture": f"{len(named) - 1}x (conv 3x3 stride 2, no padding, "
        f"{'/'.join(sorted(str(a) for a in acts))}), global average pool, linear",
        "source_names": {
            f"{name}.{leaf}": v.varname
            for name, k, b in named
            for leaf, v in (("weight", k), ("bias", b))
        },
        "splits": _split_counts(items),
    }
    return _write(dst, meta, space, items, load, shard_size, progress, "CNNs")


def _zoo_space(named: list[tuple[str, _Var, _Var]], activations: set) -> WeightSpace:
    """The zoo CNN's WeightSpace. With one activation its groups carry that activation's
    action (ReLU: positive scaling, tanh: sign); mixed or unknown (no
    ``config.activation`` column) activations keep the permutations only."""
    from converters import from_state_dict

    sd = {}
    for name, k, b in named:
        shape = (
            (k.shape[3], k.shape[2], k.shape[0], k.shape[1]) if len(k.shape) == 4 else k.shape[::-1]
        )
        sd[f"{name}.weight"] = torch.empty(shape)
        sd[f"{name}.bias"] = torch.empty(b.shape)
    (act,) = activations if len(activations) == 1 else (None,)
    space = from_state_dict(sd, "cnn", activation=str(act) if act is not None else "relu")
    if act is None:
        space = space.replace(
            groups={g: replace(grp, action=None) for g, grp in space.groups.items()},
            notes=space.notes + ("activations mixed or unknown: permutation symmetry only",),
        )
    return space


# --------------------------------------------------------------------------- registry
IMPORTERS: dict[str, Callable[..., list[Path]]] = {
    "dwsnets-mnist": import_dwsnets_mnist,
    "dwsnets-fmnist": import_dwsnets_fmnist,
    "nfn-siren": import_nfn_sirens,
    "small-cnn-zoo": import_small_cnn_zoo,
}


def import_dataset(
    kind: str, src: str | os.PathLike, dst: str | os.PathLike, **options
) -> list[Path]:
    """``IMPORTERS[kind](src, dst, **options)``: one entry point for every published set."""
    if kind not in IMPORTERS:
        raise ValueError(f"kind must be one of {sorted(IMPORTERS)}, got {kind!r}")
    return IMPORTERS[kind](src, dst, **options)
