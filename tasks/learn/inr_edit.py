"""INR editing: a metanetwork maps the weights of an INR to the weights of an edited INR.

The task of DWSNets (Navon et al. 2023, "dilation" on MNIST INRs): given a SIREN that draws
a digit, output a SIREN that draws the same digit *dilated* (a 3×3 max-pool, stride 1,
padding 1). Here on scikit-learn's 8×8 digits, one INR per image (1,797 pairs).

Pairs: the original and the dilated image are each fitted by :func:`tasks.datasets.inr.fit_sirens`
with the default :class:`~tasks.datasets.inr.INRConfig` (the DWSNets recipe) **from the same
initialization seed**, so the two INRs of a pair start from the same point and stay close
in weight space (the edit is a small residual, not a relabelling of hidden units). The
split is by image, the same logic (and, with the same ``seed``, the same images) as
:func:`tasks.datasets.inr.make_dataset`.

Editors (weights → weights, all predicting the residual ``Δ = edited − original``, added to
the input; each output layer starts at zero, so every editor starts as the identity):

* ``unf`` — ``UNFLinear`` stack (full basis), ``UNFPointwise`` ReLU between: equivariant;
* ``gmn`` — ``GMN(equivariant=True)`` on the parameter graph, node/edge outputs mapped back
  to tensors exactly as :func:`metanet.to_weights` does: equivariant;
* ``flat`` — an MLP on the flattened weights (no symmetry);
* ``identity`` — ``Δ = 0``.

Inputs are standardized per tensor (one mean/std per tensor, from the training split) and
each output tensor is scaled by the training std of its residual: scalars per tensor, so
every permutation symmetry is kept. Training loss: MSE between the image the predicted INR
draws on the 8×8 grid and the dilated target image (the DWSNets metric); weight-space MSE
to the fitted edited INR is reported too.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metanet.io import atomic_write
from metanet.space import WeightSpace
from tasks.datasets.inr import (
    INRConfig,
    digits_items,
    fit_sirens,
    image_grid,
    siren_forward,
    siren_space,
)
from tasks.learn.metrics import cosine_schedule

__all__ = [
    "EDITORS",
    "EditPairs",
    "dilate",
    "make_edit_pairs",
    "render",
    "build_editor",
    "train_editor",
    "evaluate",
]

EDITORS = ("identity", "flat", "unf", "gmn")
SPLITS = ("train", "val", "test")
_META = "metanet.inr_edit"


def dilate(images: Tensor) -> Tensor:
    """Grey-scale dilation: a 3×3 max-pool, stride 1, padding 1. ``(B, H, W)`` -> same."""
    return F.max_pool2d(images[:, None], 3, stride=1, padding=1)[:, 0]


def render(cfg: INRConfig, weights: dict[str, Tensor], resolution: int = 8) -> Tensor:
    """The images a batch of INRs draws: ``{name: (B, ...)}`` -> ``(B, res * res)``."""
    coords = image_grid(resolution, resolution).to(next(iter(weights.values())))
    return siren_forward(cfg, weights, coords)[..., 0]


@dataclass
class EditPairs:
    """Pairs of INRs: ``orig``/``edit`` ``{name: (N, ...)}``, the images ``(N, 64)`` they
    were fitted to (``image`` and ``target`` = dilated), ``split`` ``(N,)`` codes
    0/1/2 = train/val/test, and per-INR PSNRs."""

    cfg: INRConfig
    orig: dict[str, Tensor]
    edit: dict[str, Tensor]
    image: Tensor
    target: Tensor
    split: Tensor
    psnr_orig: Tensor
    psnr_edit: Tensor
    seconds: float = float("nan")

    def __len__(self) -> int:
        return self.split.numel()

    @property
    def space(self) -> WeightSpace:
        return siren_space(self.cfg)

    def indices(self, split: str) -> Tensor:
        return (self.split == SPLITS.index(split)).nonzero()[:, 0]

    def to(self, device: str | torch.device) -> EditPairs:
        """The pairs with their weights and images on ``device`` (split codes and PSNRs,
        bookkeeping, stay on the host)."""
        return replace(
            self,
            orig={n: t.to(device) for n, t in self.orig.items()},
            edit={n: t.to(device) for n, t in self.edit.items()},
            image=self.image.to(device),
            target=self.target.to(device),
        )

    def subset(self, idx: Tensor) -> EditPairs:
        return EditPairs(
            self.cfg,
            {n: t[idx] for n, t in self.orig.items()},
            {n: t[idx] for n, t in self.edit.items()},
            self.image[idx],
            self.target[idx],
            self.split[idx],
            self.psnr_orig[idx],
            self.psnr_edit[idx],
            self.seconds,
        )


def make_edit_pairs(
    path: str | os.PathLike | None = None,
    *,
    cfg: INRConfig | None = None,
    seed: int = 0,
    val: float = 0.1,
    test: float = 0.2,
    limit: int | None = None,
    batch: int = 2048,
    progress: bool = False,
) -> EditPairs:
    """Fit (original, dilated) INR pairs for the digits, one per image, or load them.

    ``path``: a safetensors cache, written atomically; an existing file made with the same
    settings is loaded instead of refitting. ``limit`` keeps the first ``limit`` images
    (quick runs). Both INRs of a pair are fitted from the same init seed (the one
    :func:`tasks.datasets.inr.make_dataset` gives the image), so they start identical.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = cfg or INRConfig()
    settings = {"config": asdict(cfg), "seed": seed, "val": val, "test": test, "limit": limit}
    if path is not None and Path(path).exists():
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[_META])
            if meta["settings"] == settings:
                t = {k: f.get_tensor(k) for k in f.keys()}
                return _from_tensors(cfg, t, meta["seconds"])
    images, items = digits_items(1, seed, val, test)
    if limit is not None:
        items = items[:limit]
    idx = torch.tensor([it.image for it in items])
    image = images[idx].reshape(len(items), -1)
    target = dilate(images[idx]).reshape(len(items), -1)
    seeds = [it.seed for it in items]
    coords = image_grid(8, 8)
    start = time.perf_counter()
    parts: dict[str, list[Tensor]] = {}
    psnrs: list[Tensor] = []
    half = max(1, batch // 2)
    for lo in range(0, len(items), half):
        hi = min(len(items), lo + half)
        # the original and the dilated image of each pair, from the same seed, in one run
        # (Adam is elementwise: each INR trains exactly as it would alone)
        tg = torch.cat([image[lo:hi], target[lo:hi]])[..., None]
        w, psnr = fit_sirens(tg, coords, seeds[lo:hi] * 2, cfg, progress)
        for n, t in w.items():
            parts.setdefault(n, []).append(t)
        psnrs.append(psnr)
    seconds = time.perf_counter() - start
    n_chunk = [t.shape[0] // 2 for t in parts[cfg.names()[0]]]
    tensors: dict[str, Tensor] = {}
    for n, ts in parts.items():
        tensors[f"orig.{n}"] = torch.cat([t[:k] for t, k in zip(ts, n_chunk)]).contiguous()
        tensors[f"edit.{n}"] = torch.cat([t[k:] for t, k in zip(ts, n_chunk)]).contiguous()
    tensors["psnr_orig"] = torch.cat([p[:k] for p, k in zip(psnrs, n_chunk)])
    tensors["psnr_edit"] = torch.cat([p[k:] for p, k in zip(psnrs, n_chunk)])
    tensors["image"], tensors["target"] = image.contiguous(), target.contiguous()
    tensors["split"] = torch.tensor([SPLITS.index(it.split) for it in items])
    if path is not None:
        meta = json.dumps({"settings": settings, "seconds": seconds})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META: meta}))
    return _from_tensors(cfg, tensors, seconds)


def _from_tensors(cfg: INRConfig, t: dict[str, Tensor], seconds: float) -> EditPairs:
    names = cfg.names()
    return EditPairs(
        cfg,
        {n: t[f"orig.{n}"] for n in names},
        {n: t[f"edit.{n}"] for n in names},
        t["image"],
        t["target"],
        t["split"],
        t["psnr_orig"],
        t["psnr_edit"],
        seconds,
    )


# --------------------------------------------------------------------------- editors
class _Scaler(nn.Module):
    """Per-tensor scalars: input mean/std and residual std (from the training split)."""

    def __init__(self, pairs: EditPairs, idx: Tensor | None = None):
        super().__init__()
        self.names = list(pairs.orig)
        for n in self.names:
            x = pairs.orig[n] if idx is None else pairs.orig[n][idx]
            d = (
                (pairs.edit[n] - pairs.orig[n])
                if idx is None
                else (pairs.edit[n] - pairs.orig[n])[idx]
            )
            x, d = x.double(), d.double()
            key = n.replace(".", "_")
            self.register_buffer(f"mean_{key}", torch.tensor(float(x.mean())))
            self.register_buffer(f"std_{key}", torch.tensor(float(x.std()) or 1.0))
            self.register_buffer(f"dstd_{key}", torch.tensor(float(d.std()) or 1.0))

    def inputs(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n in self.names:
            k = n.replace(".", "_")
            out[n] = (w[n] - getattr(self, f"mean_{k}")) / getattr(self, f"std_{k}")
        return out

    def residual(self, d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: d[n] * getattr(self, f"dstd_{n.replace('.', '_')}") for n in self.names}


class Editor(nn.Module):
    """``weights -> weights + scale * core(standardized weights)``; ``core=None``: identity."""

    def __init__(self, kind: str, scaler: _Scaler, core: nn.Module | None):
        super().__init__()
        self.kind, self.scaler, self.core = kind, scaler, core

    def delta(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.core is None:
            return {n: torch.zeros_like(t) for n, t in w.items()}
        return self.scaler.residual(self.core(self.scaler.inputs(w)))

    def forward(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        d = self.delta(w)
        return {n: w[n] + d[n] for n in w}


class _FlatCore(nn.Module):
    def __init__(self, space: WeightSpace, hidden: int = 256, layers: int = 2):
        super().__init__()
        from metanet.nn import FlatMLP

        self.space = space
        self.mlp = FlatMLP(space, space.num_params, hidden, layers)
        last = self.mlp.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        y = self.mlp(w)
        out, lo = {}, 0
        for n, t in self.space.tensors.items():
            k = math.prod(t.shape)
            out[n] = y[:, lo : lo + k].reshape(y.shape[0], *t.shape)
            lo += k
        return out


class _UNFCore(nn.Module):
    """``UNFLinear`` (full basis) layers with ReLU between; the last one zero-initialized."""

    def __init__(self, space: WeightSpace, channels: int = 16, layers: int = 3):
        super().__init__()
        from metanet.nn import UNFLinear, UNFPointwise

        widths = [1] + [channels] * (layers - 1) + [1]
        self.layers = nn.ModuleList(
            UNFLinear(space, a, b, basis="full") for a, b in zip(widths[:-1], widths[1:])
        )
        self.act = UNFPointwise()
        with torch.no_grad():
            for p in self.layers[-1].parameters():
                p.zero_()

    def forward(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        x = {n: t[:, None] for n, t in w.items()}
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return {n: t[:, 0] for n, t in x.items()}


class _GMNCore(nn.Module):
    """``GMN(equivariant=True)`` on batched parameter graphs, built and read back with
    :class:`metanet.GraphGather` (one gather per batch)."""

    def __init__(self, space: WeightSpace, hidden: int = 32, layers: int = 3):
        super().__init__()
        from metanet.graph import GraphGather
        from metanet.nn import GMN

        self.gather = GraphGather(space)
        self.gmn = GMN(
            self.gather.node_dim,
            self.gather.edge_dim,
            hidden=hidden,
            layers=layers,
            equivariant=True,
        )
        with torch.no_grad():
            for head in (self.gmn.node_out, self.gmn.edge_out):
                head[-1].weight.zero_()
                head[-1].bias.zero_()

    def forward(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        node, edge = self.gmn(self.gather.graph({n: t[:, None] for n, t in w.items()}))
        return self.gather.weights(node, edge)


def build_editor(
    kind: str, pairs: EditPairs, hidden: int | None = None, idx: Tensor | None = None
) -> Editor:
    """One of :data:`EDITORS`, its scalers measured on ``pairs`` (rows ``idx``)."""
    space = pairs.space
    scaler = _Scaler(pairs, idx)
    if kind == "identity":
        core = None
    elif kind == "flat":
        core = _FlatCore(space, hidden or 256)
    elif kind == "unf":
        core = _UNFCore(space, hidden or 16)
    elif kind == "gmn":
        core = _GMNCore(space, hidden or 32)
    else:
        raise ValueError(f"kind must be one of {EDITORS}, got {kind!r}")
    return Editor(kind, scaler, core)


# --------------------------------------------------------------------------- train / eval
@dataclass
class EditResult:
    kind: str
    test_image_mse: float
    test_weight_mse: float
    val_image_mse: float
    seconds: float
    parameters: int
    history: list


def _loss(editor: Editor, pairs: EditPairs, idx: Tensor) -> Tensor:
    pred = editor({n: t[idx] for n, t in pairs.orig.items()})
    return (render(pairs.cfg, pred) - pairs.target[idx]).pow(2).mean()


@torch.no_grad()
def evaluate(editor: Editor, pairs: EditPairs, split: str = "test", batch: int = 256) -> dict:
    """``{"image_mse", "weight_mse"}`` on ``split``: the image the edited INR draws vs the
    dilated image (mean over pixels and INRs), and the predicted weights vs the fitted
    edited INR (mean over parameters and INRs)."""
    editor.eval()
    idx = pairs.indices(split)
    img = wgt = 0.0
    n_params = sum(t[0].numel() for t in pairs.orig.values())
    for lo in range(0, len(idx), batch):
        sub = idx[lo : lo + batch]
        pred = editor({n: t[sub] for n, t in pairs.orig.items()})
        img += float((render(pairs.cfg, pred) - pairs.target[sub]).pow(2).mean(1).sum())
        wgt += float(sum((pred[n] - pairs.edit[n][sub]).pow(2).sum() for n in pred)) / n_params
    editor.train()
    n = max(1, len(idx))
    return {"image_mse": img / n, "weight_mse": wgt / n}


def train_editor(
    kind: str,
    pairs: EditPairs,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    hidden: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[Editor, EditResult]:
    """Train one editor on the training split (image MSE to the dilated image, Adam with a
    cosine schedule), report val/test metrics of the model after the last epoch.
    ``device``: where the editor trains and the pairs live while it does (the loss is
    summed there and read once an epoch)."""
    train_idx = pairs.indices("train")
    if limit is not None:
        train_idx = train_idx[:limit]
    torch.manual_seed(seed)
    editor = build_editor(kind, pairs, hidden, train_idx)
    if device is not None:
        editor.to(device)
        pairs = pairs.to(device)
    params = [p for p in editor.parameters() if p.requires_grad]
    start = time.perf_counter()
    history = []
    if params and epochs > 0:
        opt = torch.optim.Adam(params, lr=lr)
        steps = epochs * max(1, len(train_idx) // batch_size)
        sched = cosine_schedule(opt, steps)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            total = torch.zeros((), dtype=torch.float64, device=device)
            n_batches = max(1, len(order) // batch_size)
            for b in range(n_batches):
                loss = _loss(editor, pairs, order[b * batch_size : (b + 1) * batch_size])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach().double()
            history.append({"epoch": epoch + 1, "train_image_mse": float(total) / n_batches})
    seconds = time.perf_counter() - start
    test, val = evaluate(editor, pairs, "test"), evaluate(editor, pairs, "val")
    return editor, EditResult(
        kind,
        test["image_mse"],
        test["weight_mse"],
        val["image_mse"],
        seconds,
        sum(p.numel() for p in params),
        history,
    )
