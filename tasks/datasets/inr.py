"""Implicit neural representation (INR) weight datasets: fit, store, load.

Thousands of SIREN INRs (Sitzmann et al., 2020) are fitted at once: every INR's weights
are one slice of a stacked tensor, the forward pass is a batched matmul, and Adam (an
elementwise optimizer) keeps them independent, so a batch of B INRs trains exactly as B
separate runs would. Each INR is initialized from its own seed, so any shard can be
recomputed anywhere, bit for bit.

Storage (a folder): ``space.json`` (the WeightSpace of one INR), and shards
``shard-IIIII-of-NNNNN.safetensors`` holding every tensor stacked over the shard's INRs
plus, in the metadata, the shard's index rows (image, label, seed, PSNR, split). Shards
are written atomically; a rerun skips the ones that exist, so an interrupted run resumes
where it stopped. :class:`WeightDataset` reads it back.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.io import CheckpointError, atomic_write
from metanet.space import WeightSpace

__all__ = [
    "INRConfig",
    "Siren",
    "siren_space",
    "fit_sirens",
    "siren_forward",
    "image_grid",
    "INRItem",
    "digits_items",
    "image_items",
    "load_images",
    "make_dataset",
    "sine_targets",
    "WeightDataset",
    "collate_features",
    "render",
    "CoordAugment",
    "transform_values",
    "transform_coords",
]

INDEX_KEY = "metanet.inr_index"


@dataclass(frozen=True)
class INRConfig:
    """A SIREN and how it is fitted.

    ``variant="siren"`` is the standard initialization (Sitzmann et al.: first layer
    ``U(±1/in)``, the others ``U(±√(6/in)/w0)``, biases ``U(±1/√in)``). ``"dws"`` is the
    INR of the DWSNets MNIST/Fashion-MNIST datasets (Navon et al. 2023, their ``nn/inr.py``):
    every sine layer, the first included, ``U(±√(6/in)/w0)`` with zero biases, a plain
    ``nn.Linear`` output layer (``U(±1/√in)``), and ``+0.5`` added to the output. Its first
    layer starts at low frequencies and has to move to draw the image, so the image is in
    the weights rather than in which random features the initialization happened to offer.

    ``target_psnr`` stops each INR once it reaches that PSNR (DWSNets: 40 dB); the INR's
    weights are frozen from that step on, the others keep training.
    """

    in_features: int = 2
    hidden: int = 32
    depth: int = 2  # hidden layers: 2-32-32-1, the DWSNets/NFN MNIST INR
    out_features: int = 1
    w0: float = 30.0
    steps: int = 1000  # at most (DWSNets: 1,000 with early stopping at 40 dB)
    lr: float = 5e-4
    variant: str = "dws"
    target_psnr: float | None = 40.0

    def __post_init__(self):
        if self.variant not in ("siren", "dws"):
            raise ValueError(f"variant must be 'siren' or 'dws', got {self.variant!r}")

    @property
    def offset(self) -> float:
        """Constant added to the network's output (0.5 for ``"dws"``)."""
        return 0.5 if self.variant == "dws" else 0.0

    @property
    def sizes(self) -> list[int]:
        return [self.in_features] + [self.hidden] * self.depth + [self.out_features]

    def names(self) -> list[str]:
        return [f"net.{2 * i}.{k}" for i in range(len(self.sizes) - 1) for k in ("weight", "bias")]


class Sine(nn.Module):
    def __init__(self, w0: float):
        super().__init__()
        self.w0 = w0

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)


class Siren(nn.Module):
    """One INR as a module (``state_dict`` keys match the dataset's tensors)."""

    def __init__(self, cfg: INRConfig = INRConfig()):
        super().__init__()
        self.offset = cfg.offset
        layers: list[nn.Module] = []
        sizes = cfg.sizes
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(Sine(cfg.w0))
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        return self.net(coords) + self.offset


def siren_space(cfg: INRConfig = INRConfig()) -> WeightSpace:
    """The WeightSpace of one INR (hidden units permute; sign symmetry of ``sin``)."""
    from converters import from_state_dict

    return from_state_dict(Siren(cfg).state_dict(), "siren")


XY = "input 0 is the column (x), input 1 the row (y): np.meshgrid 'xy'"  # DWSNets' INRs


def image_grid(height: int, width: int, order: str = "ij") -> Tensor:
    """Pixel-centre coordinates in [-1, 1]², row-major, shape ``(height * width, 2)``:
    ``(row, column)`` per pixel (``order="ij"``, metanet's), or ``(column, row)``
    (``"xy"``, DWSNets')."""
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    if order == "xy":
        return grid.flip(-1)
    if order != "ij":
        raise ValueError(f"order must be 'ij' or 'xy', got {order!r}")
    return grid


def _grid_order(meta: dict) -> str:
    """The coordinate order a dataset's INRs were fitted on (imported DWSNets sets record
    theirs under ``source``)."""
    src = meta.get("source")
    found = meta.get("coordinates") or (src.get("coordinates") if isinstance(src, dict) else None)
    return "xy" if found == XY else "ij"


def _init(cfg: INRConfig, seeds: Sequence[int]) -> dict[str, Tensor]:
    """Stacked initial weights, INR i drawn from ``torch.Generator().manual_seed(seeds[i])``."""
    sizes = cfg.sizes
    last = len(sizes) - 2
    per: dict[str, list[Tensor]] = {n: [] for n in cfg.names()}
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if cfg.variant == "dws":
                bound = 1 / math.sqrt(a) if i == last else math.sqrt(6 / a) / cfg.w0
                bias_bound = 1 / math.sqrt(a) if i == last else 0.0
            else:
                bound = 1 / a if i == 0 else math.sqrt(6 / a) / cfg.w0
                bias_bound = 1 / math.sqrt(a)
            w = (torch.rand(b, a, generator=gen) * 2 - 1) * bound
            bias = (torch.rand(b, generator=gen) * 2 - 1) * bias_bound
            per[f"net.{2 * i}.weight"].append(w)
            per[f"net.{2 * i}.bias"].append(bias)
    return {n: torch.stack(v) for n, v in per.items()}


def siren_forward(cfg: INRConfig, w: dict[str, Tensor], coords: Tensor) -> Tensor:
    """Batched SIREN forward: stacked weights ``{name: (B, ...)}`` at ``coords (P, in)``
    -> ``(B, P, out)`` (the offset included)."""
    n_layers = len(cfg.sizes) - 1
    h = coords.expand(w["net.0.weight"].shape[0], *coords.shape)
    for i in range(n_layers):
        h = torch.baddbmm(w[f"net.{2 * i}.bias"][:, None, :], h, w[f"net.{2 * i}.weight"].mT)
        if i < n_layers - 1:
            h = torch.sin(cfg.w0 * h)
    return h + cfg.offset if cfg.offset else h


def fit_sirens(
    targets: Tensor,
    coords: Tensor,
    seeds: Sequence[int],
    cfg: INRConfig = INRConfig(),
    progress: bool = False,
    device: str | torch.device | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Fit one SIREN per target, all at once.

    Args:
        targets: ``(B, P, out_features)`` values at ``coords`` ``(P, in_features)``.
        seeds: one initialization seed per INR (drawn on the CPU, so an INR starts from
            the same weights on every device).
        device: where to fit (default: the targets' device).
    Returns:
        ``(weights, psnr)``: stacked weights ``{name: (B, ...)}`` and per-INR PSNR in dB
        (peak 1, i.e. targets in [0, 1]), on ``device``.
    """
    if len(seeds) != targets.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {targets.shape[0]} targets")
    device = torch.device(device) if device is not None else targets.device
    targets, coords = targets.to(device), coords.to(device)
    w = {n: t.to(device).requires_grad_() for n, t in _init(cfg, seeds).items()}
    opt = torch.optim.Adam(list(w.values()), lr=cfg.lr)
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"fitting {targets.shape[0]} INRs", unit="step", leave=False)
    target_mse = None if cfg.target_psnr is None else 10 ** (-cfg.target_psnr / 10)
    frozen = {n: torch.zeros_like(t) for n, t in w.items()}
    done = torch.zeros(targets.shape[0], dtype=torch.bool, device=device)
    for step in steps:
        err = siren_forward(cfg, w, coords) - targets
        mse = err.pow(2).mean(dim=(1, 2))
        if target_mse is not None:
            # early stopping per INR: once at the target, its weights stay as they are.
            # Written without a host sync per step (where() over all INRs); whether all
            # are done is asked every 16 steps: later steps leave finished INRs unchanged
            newly = (mse.detach() <= target_mse) & ~done
            with torch.no_grad():
                for n, t in w.items():
                    frozen[n] = torch.where(_bcast(newly, t), t.detach(), frozen[n])
            done = done | newly
            if step % 16 == 15 and bool(done.all()):
                break
        # per-INR mean squared error, summed: each INR gets its own gradient
        loss = mse.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target_mse is not None:
            with torch.no_grad():
                for n, t in w.items():
                    t.copy_(torch.where(_bcast(done, t), frozen[n], t))
    with torch.no_grad():
        mse = (siren_forward(cfg, w, coords) - targets).pow(2).mean(dim=(1, 2))
    psnr = -10 * torch.log10(mse.clamp_min(1e-12))
    return {n: t.detach() for n, t in w.items()}, psnr


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *[1] * (like.dim() - 1))


def sine_targets(n: int, seed: int = 0, points: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """1-D regression INRs: ``a·sin(b x)`` on ``[-π, π]`` with ``a ∈ [0.5, 2]``,
    ``b ∈ [1, 4]``. Returns ``(targets (n, points, 1), coords (points, 1), ab (n, 2))``;
    targets are scaled to [0, 1] for PSNR, ``(y / a_max + 1) / 2``."""
    gen = torch.Generator().manual_seed(seed)
    a = 0.5 + 1.5 * torch.rand(n, generator=gen)
    b = 1 + 3 * torch.rand(n, generator=gen)
    x = torch.linspace(-math.pi, math.pi, points)
    y = a[:, None] * torch.sin(b[:, None] * x[None])
    coords = (x / math.pi)[:, None]
    return ((y / 2 + 1) / 2)[..., None], coords, torch.stack([a, b], 1)


# ------------------------------------------------------------------ coordinate augmentation
def transform_coords(
    weights: dict[str, Tensor], matrix: Tensor, shift: Tensor, layer: str = "net.0"
) -> dict[str, Tensor]:
    """The INRs ``x -> f(matrix @ x + shift)``, made by editing their first layer only:
    ``W -> W @ matrix``, ``b -> b + W @ shift`` (exact: the image drawn is the old one
    seen through the affine map of its coordinates: rotated, scaled, sheared, shifted).

    ``weights`` are stacked ``{name: (B, ...)}`` (or one INR, no batch axis) with the
    input layer at ``layer.weight`` ``(..., hidden, in)`` / ``layer.bias``;
    ``matrix`` is ``(B, in, in)`` (or ``(in, in)``), ``shift`` ``(B, in)`` (or ``(in,)``).
    Every other tensor is returned unchanged (the same objects)."""
    wn, bn = f"{layer}.weight", f"{layer}.bias"
    if wn not in weights or bn not in weights:
        raise KeyError(f"transform_coords: no input layer {wn!r}/{bn!r} among the weights")
    w, b = weights[wn], weights[bn]
    d = w.shape[-1]
    if matrix.shape[-2:] != (d, d) or shift.shape[-1] != d:
        raise ValueError(
            f"transform_coords: {wn} reads {d} coordinates; got a matrix of shape "
            f"{tuple(matrix.shape)} and a shift of shape {tuple(shift.shape)}"
        )
    matrix, shift = matrix.to(w.dtype), shift.to(w.dtype)
    out = dict(weights)
    out[wn] = w @ matrix
    out[bn] = b + (w @ shift.unsqueeze(-1)).squeeze(-1)
    return out


def transform_values(
    weights: dict[str, Tensor],
    gain: Tensor,
    bias: Tensor,
    layer: str = "net.4",
    offset: float = 0.0,
) -> dict[str, Tensor]:
    """The INRs ``x -> gain * f(x) + bias``, made by editing their output layer only:
    ``W -> gain W``, ``b -> gain (b + offset) + bias - offset`` (``offset``: the constant
    the INR adds after that layer, :attr:`INRConfig.offset`). Exact: the image's contrast
    and brightness change, nothing else. ``gain``/``bias`` are ``(B,)`` for stacked
    weights (or scalars for one INR); other tensors are returned unchanged."""
    wn, bn = f"{layer}.weight", f"{layer}.bias"
    if wn not in weights or bn not in weights:
        raise KeyError(f"transform_values: no output layer {wn!r}/{bn!r} among the weights")
    w, b = weights[wn], weights[bn]
    batch = w.shape[:-2]
    if gain.shape != batch or bias.shape != batch:
        raise ValueError(
            f"transform_values: {wn} has batch shape {tuple(batch)}; got a gain of shape "
            f"{tuple(gain.shape)} and a bias of shape {tuple(bias.shape)}"
        )
    gain, bias = gain.to(w.dtype), bias.to(w.dtype)
    out = dict(weights)
    out[wn] = w * gain[..., None, None]
    out[bn] = (b + offset) * gain[..., None] + bias[..., None] - offset
    return out


@dataclass(frozen=True)
class CoordAugment:
    """Random affine maps of an INR's input coordinates, applied to its weights
    (:func:`transform_coords`): the weight-space counterpart of the image augmentations
    a CNN on the drawn images would use (Shamsian et al. 2024 augment INR weight datasets
    this way). Each draw: a rotation by ``U(±rotate)`` degrees, an isotropic scale
    ``exp(U(±log(1 + scale)))``, a shear ``U(±shear)`` and a shift ``U(±shift)`` per
    coordinate (in the grid's units: the image spans ``[-1, 1]``; a pixel of an 8×8
    image is 2/7 ≈ 0.29). ``rotate`` and ``shear`` need 2-D coordinates.

    ``contrast`` and ``brightness`` (off by default) also change what the INR draws, not
    where: its output ``f -> a f + c`` with ``a = exp(U(±log(1 + contrast)))`` and
    ``c = U(±brightness)``, made by editing its output layer (:func:`transform_values`)."""

    rotate: float = 15.0
    scale: float = 0.1
    shear: float = 0.1
    shift: float = 0.1
    contrast: float = 0.0
    brightness: float = 0.0

    def sample(
        self, n: int, dim: int = 2, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(matrix (n, dim, dim), shift (n, dim))`` in float64."""

        def u(*shape):  # U(-1, 1)
            return torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1

        if dim != 2 and (self.rotate or self.shear):
            raise ValueError(
                f"CoordAugment: rotate and shear act on 2-D coordinates; these INRs read {dim}"
            )
        s = torch.exp(u(n) * math.log1p(self.scale))
        m = s[:, None, None] * torch.eye(dim, dtype=torch.float64).expand(n, dim, dim)
        if dim == 2:
            a = u(n) * math.radians(self.rotate)
            c, si = torch.cos(a), torch.sin(a)
            rot = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)
            sh = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
            sh[:, 0, 1] = u(n) * self.shear
            m = m @ rot @ sh
        return m, u(n, dim) * self.shift

    def __repr__(self) -> str:  # the value fields only when on (captions stay short)
        keys = ["rotate", "scale", "shear", "shift"]
        keys += [k for k in ("contrast", "brightness") if getattr(self, k)]
        return f"CoordAugment({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    @classmethod
    def parse(cls, text: str) -> CoordAugment:
        """``"rotate=20,contrast=0.2"`` -> ``CoordAugment(rotate=20.0, contrast=0.2)`` (the
        other fields at their defaults; ``""`` gives the defaults)."""
        fields = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.strip().partition("=")
            try:
                if key not in cls.__dataclass_fields__:
                    raise ValueError
                fields[key] = float(value)
            except ValueError:
                names = ", ".join(cls.__dataclass_fields__)
                raise ValueError(
                    f"coordinate augmentation {text!r}: give K=V pairs, K among {names}, V a number"
                ) from None
        return cls(**fields)

    @property
    def changes_values(self) -> bool:
        return bool(self.contrast or self.brightness)

    def sample_values(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(gain (n,), bias (n,))`` in float64 for :func:`transform_values`."""
        u = torch.rand(2, n, generator=generator, dtype=torch.float64) * 2 - 1
        return torch.exp(u[0] * math.log1p(self.contrast)), u[1] * self.brightness


# --------------------------------------------------------------------------- datasets
@dataclass
class INRItem:
    """One INR of a digits dataset: its image, label, fitting seed, split and PSNR."""

    image: int
    label: int
    seed: int
    split: str
    psnr: float = float("nan")


def digits_items(
    per_image: int,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
    train_per_image: int | None = None,
) -> tuple[Tensor, list[INRItem]]:
    """scikit-learn's digits as ``(images (1797, 8, 8) in [0, 1], items)``: the items of
    :func:`image_items` for its labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    return images, image_items(d.target.tolist(), per_image, seed, val, test, train_per_image)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _as_unit(x, where: str) -> Tensor:
    """Pixel values as float32 in [0, 1]: integers scaled by their type's maximum,
    floats checked to lie in [0, 1]."""
    import numpy as np

    if x.dtype == np.bool_:
        return torch.from_numpy(x.astype(np.float32))
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        if info.min < 0 and x.min() < 0:
            raise CheckpointError(
                f"{where}: negative pixel values ({x.min()}); expected 0..{info.max}"
            )
        return torch.from_numpy(x.astype(np.float32) / float(info.max))
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not np.isfinite(x).all():
            raise CheckpointError(f"{where}: has NaN or inf pixel values")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise CheckpointError(
                f"{where}: float pixels span [{lo:g}, {hi:g}]; expected [0, 1] (or integers)"
            )
        return torch.from_numpy(x.astype(np.float32))
    raise CheckpointError(f"{where}: pixel dtype {x.dtype} is not a number type")


def load_images(
    path: str | os.PathLike, resolution: int | None = None
) -> tuple[Tensor, list[int], list[str]]:
    """Images to fit INRs to: ``(images (N, H, W, C) float32 in [0, 1], labels, classes)``.

    ``path`` is a folder of class subfolders of image files (``classes`` the subfolder
    names, sorted; labels their indices; RGBA and palette images become RGB, and a set
    with any colour image is read as RGB throughout), or an ``.npz`` with ``images``
    (``N×H×W`` or ``N×H×W×C``, integers or floats in [0, 1]) and ``labels`` (``N``
    integers), or an ``.npy`` of images alone (labels -1). All images must have one size,
    unless ``resolution`` resizes each to ``resolution × resolution`` (bilinear).
    """
    import numpy as np

    path = Path(path)
    if path.is_dir():
        from PIL import Image

        classes = sorted(
            p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        files = [
            (k, f)
            for k, c in enumerate(classes)
            for f in sorted((path / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        ]
        have = {k for k, _ in files}
        empty = [c for k, c in enumerate(classes) if k not in have]
        if files and empty:  # a class of no images: an output no INR ever trains
            raise CheckpointError(
                f"{path / empty[0]}: a class folder with no images ({', '.join(IMAGE_SUFFIXES)})"
                "; remove it or fill it"
            )
        if not files:
            raise CheckpointError(
                f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders "
                "(expected PATH/<class>/<image>)"
            )
        opened = []
        for _, f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    opened.append(im.copy())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable image ({e})") from None
        colour = any(im.mode not in ("1", "L", "LA", "I", "I;16", "F") for im in opened)
        arrays = []
        size = None
        for (_, f), im in zip(files, opened):
            im = im.convert("RGB" if colour else "L")
            if resolution is not None:
                im = im.resize((resolution, resolution), Image.BILINEAR)
            if size is None:
                size = im.size
            elif im.size != size:
                raise CheckpointError(
                    f"{f}: is {im.size[0]}x{im.size[1]}, the first image {size[0]}x{size[1]}; "
                    "pass --resolution to resize every image"
                )
            a = np.asarray(im)
            arrays.append(a if a.ndim == 3 else a[..., None])
        images = _as_unit(np.stack(arrays), str(path))
        return images, [k for k, _ in files], classes
    if path.suffix not in (".npz", ".npy"):
        raise CheckpointError(
            f"{path}: expected a folder of class subfolders of images, an .npz (images, "
            "labels) or an .npy of images"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable {path.suffix} ({e})") from None
    if path.suffix == ".npz":
        missing = [k for k in ("images", "labels") if k not in data.files]
        if missing:
            raise CheckpointError(f"{path}: has no {missing[0]!r} array (it has {data.files})")
        x, y = data["images"], data["labels"]
    else:
        x, y = data, None
    if x.ndim not in (3, 4) or 0 in x.shape:
        raise CheckpointError(f"{path}: images have shape {x.shape}; expected N×H×W or N×H×W×C")
    if y is not None:
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise CheckpointError(
                f"{path}: labels have shape {y.shape} and dtype {y.dtype}; expected {len(x)} integers"
            )
    images = _as_unit(x if x.ndim == 4 else x[..., None], str(path))
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        images = nn.functional.interpolate(
            images.permute(0, 3, 1, 2), size=(resolution, resolution), mode="bilinear",
            align_corners=True,
        ).permute(0, 2, 3, 1).contiguous()  # fmt: skip
    labels = y.tolist() if y is not None else [-1] * len(x)
    classes = [str(c) for c in sorted(set(labels))]
    return images, labels, classes


def image_items(
    labels: Sequence[int],
    per_image: int,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
    train_per_image: int | None = None,
) -> list[INRItem]:
    """``per_image`` items per image, each with its own fitting seed, split by image (all
    INRs of an image share a split; ``val``/``test`` fractions, the order drawn from
    ``seed``). ``train_per_image``: that many items of each *training* image instead
    (more INRs of the same images: the augmentation of Shamsian et al. 2024), while
    validation and test keep ``per_image``. The first ``per_image`` seeds of an image do
    not depend on it."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(test * n), round(val * n)
    split = {}
    for k, i in enumerate(order):
        split[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    more = max(per_image, train_per_image or per_image)
    base = seed * 1_000_003
    extra = base + n * per_image  # the extra seeds come after every image's first ones

    def fitting_seed(i: int, r: int) -> int:
        if r < per_image:
            return base + i * per_image + r
        return extra + i * (more - per_image) + r - per_image

    return [
        INRItem(i, int(labels[i]), fitting_seed(i, r), split[i])
        for i in range(n)
        for r in range(more if split[i] == "train" else per_image)
    ]


def _shard_path(root: Path, i: int, n: int) -> Path:
    return root / f"shard-{i:05d}-of-{n:05d}.safetensors"


def _inside(path: Path, root: Path) -> bool:
    p, r = path.resolve(), root.resolve()
    return p == r or r in p.parents


def make_dataset(
    out: str | os.PathLike,
    *,
    per_image: int = 10,
    train_per_image: int | None = None,
    cfg: INRConfig = INRConfig(),
    images: str | os.PathLike | None = None,
    resolution: int | None = None,
    shard: tuple[int, int] | None = None,
    num_shards: int = 10,
    batch: int = 2048,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
    dwsnets: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Fit ``per_image`` SIRENs to every image and store them (``train_per_image``: that
    many to each training image, and ``per_image`` to the validation and test images).

    The images are scikit-learn's digits (default), or ``images``: a folder of class
    subfolders of image files, or an ``.npz``/``.npy`` (see :func:`load_images`); any size
    and channel count (the SIREN's outputs are the channels). ``resolution`` resizes them
    (digits: 8 native, larger values upsample, e.g. 28 as in MNIST INR datasets; other
    images: their own size by default). The dataset is cut into ``num_shards`` shards;
    ``shard=(i, n)`` makes only shard ``i`` (``n`` must equal ``num_shards``), so shards can
    run on different machines into one folder. Existing shards are skipped (resume).

    ``dwsnets``: also write the INRs in the layout DWSNets publishes its MNIST INRs in
    (``mnist_png_{training|testing}_{label}_{index}/checkpoints/model_final.pth`` holding
    ``seq.{0,1,2}.{weight,bias}``, and ``mnist_splits.json``), fitted on their coordinate
    convention; :func:`tasks.datasets.field.import_dwsnets_mnist` reads it back. It needs
    their setting: 28×28 grayscale images, labels 0-9, the ``dws`` SIREN at ``w0`` 30.
    Returns the shard paths written or found.
    """
    import dataclasses

    root = Path(out)
    if shard is not None and shard[1] != num_shards:
        raise ValueError(f"--shard {shard[0]}/{shard[1]}: this dataset has {num_shards} shards")
    if train_per_image is not None and train_per_image < per_image:
        raise ValueError(
            f"--train-views {train_per_image}: fewer than --per-image {per_image}; training "
            "images get at least as many INRs as the others"
        )
    if train_per_image == per_image:
        train_per_image = None  # the same dataset as without it
    if images is None:
        resolution = resolution or 8
        pixels, items = digits_items(per_image, seed, val, test, train_per_image)
        if resolution != 8:
            pixels = nn.functional.interpolate(
                pixels[:, None], size=(resolution, resolution), mode="bilinear", align_corners=True
            )[:, 0]
        pixels = pixels[..., None]
        source, extra = "sklearn.datasets.load_digits", {}
    else:
        src = Path(images)
        for place in (root, Path(dwsnets) if dwsnets else None):
            if place is not None and _inside(place, src):
                raise CheckpointError(f"{place}: is inside the input {src}; write it elsewhere")
        pixels, labels, classes = load_images(src, resolution)
        items = image_items(labels, per_image, seed, val, test, train_per_image)
        source = {"path": str(src.resolve()), "kind": "images"}
        extra = {"classes": classes}
    height, width, channels = pixels.shape[1:]
    if cfg.out_features != channels:
        cfg = dataclasses.replace(cfg, out_features=channels)
    order = "ij"
    if dwsnets is not None:
        problems = [
            (height, width) != (28, 28) and f"images are {height}x{width}, not 28x28",
            channels != 1 and f"images have {channels} channels, not 1",
            any(not 0 <= it.label <= 9 for it in items) and "labels are not all 0-9",
            cfg.variant != "dws" and f"the SIREN is {cfg.variant!r}, not 'dws'",
            cfg.w0 != 30.0 and f"w0 is {cfg.w0:g}, not 30",
        ]
        problem = next((p for p in problems if p), None)
        if problem:
            raise CheckpointError(
                f"--dwsnets {dwsnets}: DWSNets' layout holds MNIST INRs; {problem}"
            )
        order = "xy"  # their coordinates: the column first
    coords = image_grid(height, width, order)
    meta = {
        "config": asdict(cfg),
        "per_image": per_image,
        **({"train_per_image": train_per_image} if train_per_image else {}),
        "resolution": height if height == width else [height, width],
        "seed": seed,
        "num_shards": num_shards,
        "source": source,
        **extra,
    }
    if order == "xy":
        meta["coordinates"] = XY
    old = Path(dwsnets) / "mnist_splits.json" if dwsnets is not None else None
    if old is not None and old.exists():  # checked before anything is written
        try:
            same = json.loads(old.read_text()) == _dwsnets_splits(items)
        except (OSError, UnicodeDecodeError, ValueError):
            same = False
        if not same:
            raise CheckpointError(
                f"--dwsnets {dwsnets}: holds another dataset's mnist_splits.json; its .pth "
                "files would be mixed with these: use a new folder"
            )
    with removed_if_refused(root, Path(dwsnets) if dwsnets else None):
        check_dataset_folder(root)
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / "dataset.json", meta, check_same=True)
        space_path = root / "space.json"
        if not space_path.exists():
            atomic_write(space_path, lambda tmp: Path(tmp).write_text(siren_space(cfg).to_json(2)))
        if dwsnets is not None:
            _write_dwsnets_splits(Path(dwsnets), items)
        wanted = [shard[0]] if shard is not None else range(num_shards)
        per_shard = math.ceil(len(items) / num_shards)
        paths = []
        for i in wanted:
            path = _shard_path(root, i, num_shards)
            paths.append(path)
            if path.exists():
                continue  # finished earlier: resume
            chunk = items[i * per_shard : (i + 1) * per_shard]
            parts: dict[str, list[Tensor]] = {}
            for start in range(0, len(chunk), batch):
                sub = chunk[start : start + batch]
                targets = pixels[[it.image for it in sub]].reshape(len(sub), -1, channels)
                w, psnr = fit_sirens(
                    targets, coords, [it.seed for it in sub], cfg, progress, device
                )
                for it, p in zip(sub, psnr.tolist()):
                    it.psnr = round(p, 4)
                for n, t in w.items():
                    parts.setdefault(n, []).append(t.cpu())
            tensors = {n: torch.cat(v).contiguous() for n, v in parts.items()}
            rows = [asdict(it) for it in chunk]
            _check_finite(path, tensors, rows)  # before the DWSNets copies are written
            if dwsnets is not None:
                _write_dwsnets(Path(dwsnets), i * per_shard, chunk, tensors, cfg)
            _save_shard(path, tensors, rows)
            if progress:
                mean = sum(r["psnr"] for r in rows) / max(1, len(rows))
                print(f"wrote {path.name}: {len(rows)} INRs, mean PSNR {mean:.2f} dB")
        return paths


@contextlib.contextmanager
def removed_if_refused(*folders: Path | None):
    """The folders among ``folders`` that do not exist yet are removed if the body raises
    a :class:`CheckpointError` (bad input found on the way: a fit that diverged, a source
    holding NaN). A rerun would meet the same input again, or with other settings be
    refused as another dataset: nothing written there could be resumed. An interrupted
    run keeps its finished shards."""
    made = [q for q in folders if q is not None and not q.exists()]
    try:
        yield
    except CheckpointError:
        for q in made:
            shutil.rmtree(q, ignore_errors=True)
        raise


def _dwsnets_path(index: int, item: INRItem) -> str:
    kind = "testing" if item.split == "test" else "training"
    return f"mnist_png_{kind}_{item.label}_{index}/checkpoints/model_final.pth"


def _dwsnets_splits(items: Sequence[INRItem]) -> dict:
    """``mnist_splits.json`` as DWSNets' ``generate_data_splits.py`` writes it."""
    splits = {s: {"path": [], "label": []} for s in ("train", "val", "test")}
    for k, it in enumerate(items):
        splits[it.split]["path"].append(_dwsnets_path(k, it))
        splits[it.split]["label"].append(it.label)
    return splits


def _write_dwsnets_splits(folder: Path, items: Sequence[INRItem]) -> None:
    """The splits file (``make_dataset`` has refused a folder holding another's)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "mnist_splits.json", _dwsnets_splits(items))


def _write_dwsnets(
    folder: Path, first: int, chunk: Sequence[INRItem], tensors: dict[str, Tensor], cfg: INRConfig
) -> None:
    """One ``.pth`` per INR (their ``seq.{k}`` names for our ``net.{2k}``)."""
    names = cfg.names()
    for j, it in enumerate(chunk):
        target = folder / _dwsnets_path(first + j, it)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        sd = {f"seq.{int(n.split('.')[1]) // 2}.{n.split('.')[2]}": tensors[n][j].clone()
              for n in names}  # fmt: skip
        atomic_write(target, lambda tmp, sd=sd: torch.save(sd, tmp))


def check_dataset_folder(root: Path) -> None:
    """A dataset is written into a new or empty folder, or one that holds a dataset
    (resumed, or refused as another): never among a user's own files."""
    from metanet.shards import TMP_MARK

    if not root.is_dir() or (root / "dataset.json").exists():
        return
    theirs = sorted(p.name for p in root.iterdir() if TMP_MARK not in p.name)
    if theirs:
        raise CheckpointError(
            f"{root}: holds {theirs[0]!r} and no dataset.json; write the dataset into a new "
            "or empty folder"
        )


def _check_finite(path: Path, tensors: dict[str, Tensor], rows: list[dict]) -> None:
    """A shard's networks must be finite: a fit that diverged (too high an lr or w0) or a
    source holding NaN would give a dataset nothing can learn from. Refused naming the
    networks, before the shard is written."""
    for name, t in tensors.items():
        if not t.is_floating_point() or not t.numel() or bool(torch.isfinite(t).all()):
            continue
        bad = (~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero().flatten().tolist()
        first = {k: v for k, v in list(rows[bad[0]].items())[:4]} if rows else {}
        raise CheckpointError(
            f"{path.parent}: {len(bad)} of the {len(t)} networks of {path.name} have NaN or "
            f"inf in {name!r} (the first: {first}); a fit that diverged (lower --lr or --w0) "
            "or a source holding NaN? This shard is not written"
        )


def _save_shard(path: Path, tensors: dict[str, Tensor], rows: list[dict]) -> None:
    from safetensors.torch import save_file

    _check_finite(path, tensors, rows)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={INDEX_KEY: json.dumps(rows)}))


def _read_meta(path: Path) -> dict:
    """A dataset's ``dataset.json``: an object with a ``num_shards`` count, or a
    :class:`CheckpointError` naming the file."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    n = meta.get("num_shards")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CheckpointError(f"{path}: 'num_shards' is {n!r}; expected a shard count")
    return meta


def _write_json(path: Path, data: dict, check_same: bool = False) -> None:
    if path.exists() and check_same:
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: not readable JSON ({e}); the folder is not a dataset of these "
                "settings: use a new folder"
            ) from None
        if old != data:
            raise CheckpointError(
                f"{path}: the folder holds a dataset made with other settings ({old}); "
                "use a new folder"
            )
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


class WeightDataset(torch.utils.data.Dataset):
    """A folder of weight shards (INRs, or any stacked checkpoints with an index).

    Items are ``(sample, label)``; ``format`` picks the sample:

    * ``"weights"``: ``{name: Tensor(*shape)}``;
    * ``"features"``: ``{name: Tensor(1, *shape)}`` (one channel, for ``UNFLinear``);
    * ``"graph"``: a :class:`metanet.ParamGraph` with ``y`` set (PyG ``DataLoader`` ready);
    * ``"flat"``: one vector (for flat baselines).

    ``augment=True`` applies a fresh random group element of the space to every sample
    drawn (permutations: a different but equivalent network each epoch).
    ``standardize=True`` shifts and scales each tensor by one mean/std measured on the
    training split (a per-tensor scalar: every permutation is kept);
    ``standardize="scale"`` only divides by the root mean square, which also keeps the
    sign and positive-scale symmetries (a shift does not: ``-w - m != -(w - m)``).
    ``canonicalize=True`` first maps every INR to its sign canonical form
    (:func:`metanet.canonicalize_sign`: odd activations such as ``sin`` let a hidden
    neuron's sign flip without changing the function), so only permutations remain.
    ``flip_signs=True`` makes the augmentation negate random neurons of the sign groups too
    (the rest of the group; pointless with ``canonicalize``, which it then leaves alone).
    ``probes=P`` adds each network's probe features (:mod:`metanet.probe`: every neuron's
    activation at ``P`` fixed inputs) as extra tensors ``probe:<set>`` of the space,
    computed once from the stored (canonical, unstandardized) weights. An INR dataset
    probes its SIREN at ``P`` coordinates drawn uniformly from ``[-1, 1]^2`` (seed
    ``probe_seed``, the same for every split); any other dataset needs ``probe_model``
    (a module whose ``state_dict`` matches the space) and ``probe_inputs`` (``(P, ...)``).
    ``coords=CoordAugment(...)`` (INR datasets) draws a fresh random affine map of every
    sample's input coordinates (:func:`transform_coords`: the image rotated, scaled,
    sheared, shifted; with its ``contrast``/``brightness`` also a random change of the
    values drawn, :func:`transform_values`) before the sign canonicalization, probes and
    standardization, so those are computed on the transformed INR (standardized with the
    statistics of the untransformed training split).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        format: str = "weights",
        augment: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        standardize: bool | str = False,
        canonicalize: bool = False,
        flip_signs: bool = False,
        probes: int = 0,
        probe_seed: int = 0,
        probe_model: nn.Module | None = None,
        probe_inputs: Tensor | None = None,
        coords: CoordAugment | None = None,
    ):
        from safetensors import safe_open

        if format not in ("weights", "features", "graph", "flat"):
            raise ValueError(f"format must be weights, features, graph or flat, got {format!r}")
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.exists():
            raise CheckpointError(f"{self.root}: no dataset.json; not a weight dataset folder")
        self.meta = _read_meta(meta_path)
        space_path = self.root / "space.json"
        try:
            self.space = WeightSpace.from_json(space_path.read_text())
        except OSError as e:
            raise CheckpointError(f"{space_path}: unreadable ({e.strerror or e})") from None
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{space_path}: not a WeightSpace ({e})") from None
        n = self.meta["num_shards"]
        missing = [i for i in range(n) if not _shard_path(self.root, i, n).exists()]
        if missing:
            raise CheckpointError(
                f"{self.root}: shards {missing[:5]}{'…' if len(missing) > 5 else ''} of {n} "
                "are missing; finish them first (make_dataset resumes)"
            )
        parts: dict[str, list[Tensor]] = {}
        rows: list[dict] = []
        for i in range(n):
            path = _shard_path(self.root, i, n)
            try:
                with safe_open(str(path), framework="pt") as f:
                    these = json.loads(f.metadata()[INDEX_KEY])
                    # a shard past the last network (more shards than networks) is empty
                    names = self.space.tensors if these != [] else ()
                    got = {name: f.get_tensor(name) for name in names}
            except Exception as e:  # noqa: BLE001 - name the file at fault
                raise CheckpointError(f"{path}: unreadable shard ({e})") from None
            if not isinstance(these, list) or not all(
                isinstance(r, dict) and isinstance(r.get("split"), str) for r in these
            ):
                raise CheckpointError(f"{path}: its index is not a list of rows with a 'split'")
            for name, t in got.items():
                if t.dim() == 0 or t.shape[0] != len(these):
                    raise CheckpointError(
                        f"{path}: {len(these)} index rows but tensor {name!r} holds "
                        f"{t.shape[0] if t.dim() else 0} networks"
                    )
                parts.setdefault(name, []).append(t)
            rows += these
        keep = [k for k, r in enumerate(rows) if split is None or r["split"] == split]
        idx = torch.tensor(keep, dtype=torch.long)
        full = {n: torch.cat(v) for n, v in parts.items()}
        self.coords = coords
        self.base_space = self.space  # before probe tensors are added
        self._canonicalize = canonicalize
        self._probe: tuple[nn.Module, Tensor] | None = None
        if coords is not None:
            if "config" not in self.meta:
                raise CheckpointError(f"{self.root}: coords= augments INRs; not an INR dataset")
            self._raw = {n: t[idx].to(dtype) for n, t in full.items()}
            inr_cfg = INRConfig(**self.meta["config"])
            self._input_layer = inr_cfg.names()[0].removesuffix(".weight")
            self._output_layer = (inr_cfg.names()[-1].removesuffix(".bias"), inr_cfg.offset)
        if canonicalize:
            from metanet.canonical import canonicalize_sign

            full = canonicalize_sign(full, self.space)
        if probes or probe_inputs is not None:
            self.space, full = self._with_probes(
                full, probes, probe_seed, probe_model, probe_inputs
            )
        self.stats: dict[str, tuple[float, float]] = {}
        if standardize not in (False, True, "scale"):
            raise ValueError(f"standardize must be True, False or 'scale', got {standardize!r}")
        if standardize:
            # one scale per tensor (a scalar commutes with every permutation), from the
            # training split only: SIREN layers differ in scale by ~w0
            train = torch.tensor([k for k, r in enumerate(rows) if r["split"] == "train"])
            for n, t in full.items():
                ref = t[train].double()
                if standardize == "scale":
                    self.stats[n] = (0.0, float(ref.pow(2).mean().sqrt()) or 1.0)
                else:
                    spread = float(ref.std()) if len(ref) > 1 else 0.0  # one network: none
                    self.stats[n] = (float(ref.mean()), spread or 1.0)
                full[n] = (t - self.stats[n][0]) / self.stats[n][1]
        self.tensors = {n: t[idx].to(dtype) for n, t in full.items()}
        self.rows = [rows[k] for k in keep]
        self.labels = torch.tensor([r["label"] for r in self.rows])
        self.format, self.augment = format, augment
        self.flip_signs = flip_signs and augment and not canonicalize
        self.generator = torch.Generator().manual_seed(seed)

    def _with_probes(
        self,
        full: dict[str, Tensor],
        probes: int,
        seed: int,
        model: nn.Module | None,
        inputs: Tensor | None,
    ) -> tuple[WeightSpace, dict[str, Tensor]]:
        from metanet.probe import with_probes

        if model is None or inputs is None:
            cfg = self.meta.get("config")
            if cfg is None:
                raise CheckpointError(
                    f"{self.root}: not an INR dataset; probe features need probe_model= and "
                    "probe_inputs="
                )
            cfg = INRConfig(**cfg)
            model = model if model is not None else Siren(cfg)
            if inputs is None:
                g = torch.Generator().manual_seed(seed)
                inputs = torch.rand(probes, cfg.in_features, generator=g) * 2 - 1
        model = model.eval()
        self._probe = (model, inputs)
        with torch.no_grad():
            return with_probes(model, self.space, full, inputs.to(next(iter(full.values())).dtype))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def psnr(self) -> Tensor:
        return torch.tensor([r["psnr"] for r in self.rows])

    def weights(self, i: int) -> dict[str, Tensor]:
        if self.coords is not None:
            return {n: t[0] for n, t in self.gather([i]).items()}
        return {n: t[i] for n, t in self.tensors.items()}

    def gather(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """The samples ``indices`` stacked, ``{name: (len(indices), *shape)}``: the stored
        tensors, or with ``coords`` a fresh coordinate augmentation of each (then sign
        canonical form, probe features and standardization, as the stored ones have)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.coords is None:
            return {n: t[idx] for n, t in self.tensors.items()}
        w = {n: t[idx] for n, t in self._raw.items()}
        first = self._input_layer
        dim = w[f"{first}.weight"].shape[-1]
        matrix, shift = self.coords.sample(len(idx), dim, self.generator)
        w = transform_coords(w, matrix, shift, first)
        if self.coords.changes_values:
            gain, bias = self.coords.sample_values(len(idx), self.generator)
            w = transform_values(w, gain, bias, *self._output_layer)
        if self._canonicalize:
            from metanet.canonical import canonicalize_sign

            w = canonicalize_sign(w, self.base_space)
        if self._probe is not None:
            from metanet.probe import probe_features

            model, inputs = self._probe
            with torch.no_grad():
                w.update(
                    probe_features(model, self.base_space, w, inputs.to(w[f"{first}.weight"].dtype))
                )
        for n, (mean, std) in self.stats.items():
            w[n] = (w[n] - mean) / std
        return w

    def __getitem__(self, i: int):
        w = self.weights(i)
        if self.augment:
            w = self.space.apply(w, self.space.random_element(self.generator))
        if self.flip_signs:
            from metanet.canonical import apply_signs, random_signs

            w = apply_signs(w, self.space, random_signs(self.space, self.generator))
        label = self.labels[i]
        if self.format == "weights":
            return w, label
        if self.format == "features":
            return {n: t[None] for n, t in w.items()}, label
        if self.format == "flat":
            return torch.cat([w[n].reshape(-1) for n in self.space.tensors]), label
        from metanet.graph import to_graph

        g = to_graph(self.space, w)
        g.y = label.reshape(1)
        return g

    def __iter__(self) -> Iterator:
        for i in range(len(self)):
            yield self[i]


@torch.no_grad()
def render(ds: WeightDataset, resolution: int | None = None, chunk: int = 2048) -> Tensor:
    """The images the INRs of ``ds`` draw, ``(len(ds), H, W)`` (``(len(ds), H, W, C)``
    for colour) at their pixel centres (the dataset's resolution, or ``resolution``). ``ds`` must hold the raw weights (no
    ``standardize``); canonical or permuted weights draw the same images."""
    if ds.stats:
        raise ValueError("render needs the raw weights: open the dataset without standardize")
    cfg = INRConfig(**ds.meta["config"])
    r = resolution or ds.meta.get("resolution", 8)
    h, w_ = (r, r) if isinstance(r, int) else tuple(r)
    coords = image_grid(h, w_, _grid_order(ds.meta))
    shape = (h, w_) if cfg.out_features == 1 else (h, w_, cfg.out_features)
    out = []
    for a in range(0, len(ds), chunk):
        w = {n: t[a : a + chunk].float() for n, t in ds.tensors.items() if n in ds.space.tensors}
        y = siren_forward(cfg, w, coords)
        out.append((y[..., 0] if cfg.out_features == 1 else y).reshape(-1, *shape))
    return torch.cat(out) if out else torch.zeros(0, *shape)


def collate_features(batch: list) -> tuple[dict[str, Tensor], Tensor]:
    """Stack ``("features", label)`` items into ``({name: (B, 1, *shape)}, labels)``."""
    feats = {n: torch.stack([b[0][n] for b in batch]) for n in batch[0][0]}
    return feats, torch.stack([b[1] for b in batch])
