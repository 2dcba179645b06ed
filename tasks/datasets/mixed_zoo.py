"""A zoo of mixed architectures, and one GMN that predicts generalization across them.

GMN's main benchmark (Lim et al. 2024) is a dataset of *diverse* architectures: one graph
metanetwork reads CNNs, ResNets and transformers alike, because every network is a
parameter graph. This module makes the non-CNN families and trains that GMN:

* :data:`ARCHITECTURES` — a ResNet-like (conv stem, one residual block, pool, linear)
  and a ViT-like (2×2 patch embedding, learned positions, one pre-norm attention block
  with 2 heads and an MLP, mean over tokens, linear) network for 8×8 digits;
* :func:`make_mixed_zoo` — ``n`` of each, trained on digits with :mod:`tasks.datasets.zoo`'s
  per-model recipes (:func:`tasks.datasets.zoo.sample_hparams`), every architecture a
  :class:`tasks.datasets.inr.WeightDataset` folder of its own (its WeightSpace from
  :func:`converters.from_module`). Many copies train at once with ``torch.func.vmap``
  over stacked parameters (each model its own batches and Adam state), for any module;
* :func:`fit_mixed` — one GMN on the graphs of any list of zoo folders (these and the
  CNN families of :func:`tasks.datasets.zoo.make_varied_zoo`), built with one ``node_dim`` and
  ``edge_dim`` so PyG's ``Batch`` stacks them; Kendall τ on the pooled test splits and
  per family.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metanet.io import atomic_write
from tasks.datasets.inr import _save_shard, _shard_path, _write_json

__all__ = [
    "DigitResNet",
    "DigitViT",
    "Architecture",
    "ARCHITECTURES",
    "train_batched",
    "make_mixed_zoo",
    "fit_mixed",
    "MixedResult",
]

CLASSES = 10


class DigitResNet(nn.Module):
    """conv 1→w, ReLU, [conv w→w, ReLU, conv w→w] + skip, ReLU, conv w→w s2, ReLU, pool, linear."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.conv2(F.relu(self.conv1(h))))
        h = F.relu(self.down(h)).mean((-2, -1))
        return self.head(h)


class DigitViT(nn.Module):
    """2×2 patches → ``dim`` tokens (16 of them) + positions, one pre-norm block
    (2-head attention with a fused qkv, GELU MLP), final norm, mean over tokens, linear."""

    def __init__(self, dim: int = 16, heads: int = 2, mlp: int = 32):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (b, 16, dim)
        b, n, d = t.shape
        qkv = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        t = t + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(self.norm(t).mean(1))


@dataclass(frozen=True)
class Architecture:
    """A mixed-zoo family: a module factory and its recipe ranges (as :class:`tasks.datasets.zoo.Family`)."""

    name: str
    build: Callable[[], nn.Module]
    description: str
    activations: tuple[str, ...] = ("relu",)
    steps: tuple[int, int] = (20, 600)
    batch_sizes: tuple[int, ...] = (16, 32, 64)


ARCHITECTURES = (
    Architecture("resnet", DigitResNet, "conv1-8, residual block (2 conv8-8), conv8-8 s2, linear"),
    Architecture(
        "vit", DigitViT, "2x2 patch embedding to 16 tokens of 16, 1 pre-norm block (2 heads)"
    ),
)


def _init(arch: Architecture, seed: int, init_scale: float) -> dict[str, Tensor]:
    """PyTorch's default init from ``seed``; matrices and kernels scaled by ``init_scale``
    (norm scales and positions keep theirs)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed * 7919 + 1)
        model = arch.build()
    return {
        n: (p.detach() * init_scale if p.dim() > 1 and n != "pos" else p.detach().clone())
        for n, p in model.named_parameters()
    }


def train_batched(
    arch: Architecture,
    hps: list,
    data,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Train one ``arch`` network per recipe (all the same batch size), together.

    The stacked parameters go through ``torch.func.vmap(functional_call)`` in the zoos'
    loop, :func:`tasks.datasets.zoo.train_stacked`: each model draws its own batches and
    noisy labels and has its own Adam (β 0.9/0.999, ε 1e-8, decoupled weight decay,
    learning rate, step count), as the CNN families' models do. ``device``: where they
    train (weights, Adam's moments, data, labels; the batch draws stay on the host).
    Returns the stacked final weights ``{name: (B, *shape)}`` on that device."""
    from torch.func import functional_call, vmap

    from tasks.datasets.zoo import train_stacked

    device = torch.device(device) if device is not None else torch.device("cpu")
    module = arch.build().to(device)
    forward = vmap(lambda p, x: functional_call(module, p, (x,)))
    x_train = data.x_train.to(device)

    def loss_fn(params, live, idx, y):
        logits = forward(params, x_train[idx])  # (B, batch, 10)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / len(y[0])

    desc = f"training {len(hps)} {arch.name} (batch {hps[0].batch_size})"
    inits = [_init(arch, h.seed, h.init_scale) for h in hps]
    return train_stacked(inits, hps, data.y_train, loss_fn, device, desc if progress else None)


@torch.no_grad()
def _accuracy(arch: Architecture, w: dict[str, Tensor], x: Tensor, y: Tensor):
    from torch.func import functional_call, vmap

    module = arch.build()
    logits = vmap(lambda p: functional_call(module, p, (x,)))(w)  # (B, n, 10)
    acc = (logits.argmax(-1) == y).double().mean(1)
    ce = F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1), reduction="none")
    return acc, ce.double().mean(1)


def make_mixed_zoo(
    root: str | os.PathLike,
    n: int = 400,
    *,
    architectures: Sequence[Architecture] = ARCHITECTURES,
    seed: int = 0,
    num_shards: int = 2,
    val: float = 0.1,
    test: float = 0.2,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict[str, list[Path]]:
    """Train ``n`` networks of each architecture into ``root/<name>/`` (a zoo folder each).

    Model ``i`` of architecture ``k`` is seeded by ``seed * 1_000_003 + 100_000_000 * (k +
    1) + i``; reruns resume (finished shards are kept) and are bit-identical (one thread).
    Returns ``{name: shard paths}``."""
    from tasks.datasets.zoo import _one_thread

    return _one_thread(
        _make_mixed, Path(root), n, architectures, seed, num_shards, val, test, max_steps, progress
    )


def _make_mixed(root, n, architectures, seed, num_shards, val, test, max_steps, progress):
    from converters import from_module
    from tasks.datasets import digits
    from tasks.datasets.zoo import _split, sample_hparams

    data = digits.load(0.25, seed=0)
    out = {}
    for k, arch in enumerate(architectures):
        folder = root / arch.name
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": "mixed_zoo",
            "architecture": arch.description,
            "name": arch.name,
            "n": n,
            "seed": seed,
            "num_shards": num_shards,
            "val": val,
            "test": test,
            "source": "sklearn.datasets.load_digits (tasks.datasets.digits.load(0.25, seed=0))",
        }
        if max_steps is not None:
            meta["max_steps"] = max_steps
        _write_json(folder / "dataset.json", meta, check_same=True)
        space_path = folder / "space.json"
        if not space_path.exists():
            space = from_module(arch.build(), torch.zeros(1, 1, 8, 8))
            atomic_write(space_path, lambda tmp, s=space: Path(tmp).write_text(s.to_json(2)))
        splits = _split(n, seed, val, test)
        per_shard = math.ceil(n / num_shards)
        out[arch.name] = []
        for s in range(num_shards):
            path = _shard_path(folder, s, num_shards)
            out[arch.name].append(path)
            if path.exists():
                continue
            ids = list(range(s * per_shard, min(n, (s + 1) * per_shard)))
            offset = seed * 1_000_003 + 100_000_000 * (k + 1)
            hps = [sample_hparams(offset + i, arch) for i in ids]
            if max_steps is not None:
                hps = [replace(h, steps=min(h.steps, max_steps)) for h in hps]
            stacked: dict[str, Tensor] = {}
            for bs in sorted({h.batch_size for h in hps}):
                pos = [j for j, h in enumerate(hps) if h.batch_size == bs]
                w = train_batched(arch, [hps[j] for j in pos], data, progress)
                for name, t in w.items():
                    stacked.setdefault(name, torch.empty(len(ids), *t.shape[1:]))[pos] = t
            acc, _ = _accuracy(arch, stacked, data.x_test, data.y_test)
            _, loss = _accuracy(arch, stacked, data.x_train, data.y_train)
            rows = [
                {
                    "model": i,
                    "split": splits[i],
                    "accuracy": round(float(acc[j]), 6),
                    "train_loss": round(float(loss[j]), 6),
                    "label": min(CLASSES - 1, int(float(acc[j]) * CLASSES)),
                    **asdict(hps[j]),
                }
                for j, i in enumerate(ids)
            ]
            _save_shard(path, {k2: v.contiguous() for k2, v in stacked.items()}, rows)
            if progress:
                mean = sum(r["accuracy"] for r in rows) / max(1, len(rows))
                print(f"wrote {arch.name}/{path.name}: {len(rows)} nets, mean accuracy {mean:.3f}")
    return out


@dataclass
class MixedResult:
    test_kendall_tau: float  # on the pooled test splits of all families
    val_kendall_tau: float
    family_tau: dict[str, float]  # test τ within each family
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _graphs(
    roots: Sequence[Path], split: str, node_dim: int, edge_dim: int, limit: int | None = None
) -> list:
    from metanet.graph import to_graph
    from tasks.datasets.inr import WeightDataset

    out = []
    for fam, root in enumerate(roots):
        ds = WeightDataset(root, split, standardize=True)
        for i in range(min(len(ds), limit or len(ds))):
            g = to_graph(ds.space, ds.weights(i), node_dim=node_dim, edge_dim=edge_dim)
            g.y = torch.tensor([float(ds.rows[i]["accuracy"])])
            g.family = torch.tensor([fam])
            out.append(g)
    return out


def _widths(roots: Sequence[Path]) -> tuple[int, int]:
    """The node and edge widths every family's graphs fit: the largest of their defaults."""
    from metanet.graph import to_graph
    from tasks.datasets.inr import WeightDataset

    node, edge = 1, 1
    for root in roots:
        ds = WeightDataset(root, "train")
        g = to_graph(ds.space, ds.weights(0))
        node, edge = max(node, g.x.shape[1]), max(edge, g.edge_attr.shape[1])
    return node, edge


@torch.no_grad()
def _predict(model: nn.Module, graphs: list, batch: int = 64, device=None) -> Tensor:
    from torch_geometric.data import Batch

    from tasks.learn.train import _to

    model.eval()
    out = [
        model(_to(Batch.from_data_list(graphs[s : s + batch]), device)).reshape(-1).cpu()
        for s in range(0, len(graphs), batch)
    ]
    model.train()
    return torch.cat(out)


def _tau(p: Tensor, y: Tensor) -> float:
    from tasks.learn.metrics import kendall_tau

    return kendall_tau(p, y)


def fit_mixed(
    roots: Sequence[str | os.PathLike],
    *,
    epochs: int = 40,
    patience: int | None = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    hidden: int = 16,
    seed: int = 0,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> MixedResult:
    """One GMN trained on the union of the zoo folders ``roots`` (any architectures).

    Each family's weights are standardized by its own per-tensor statistics; all graphs
    are built with the same ``node_dim``/``edge_dim`` and batch together. MSE on test
    accuracy, Adam + cosine, early stopping on the pooled validation τ; returns the
    pooled and per-family test τ at the best validation epoch. ``limit`` caps each
    family's training networks (the first ``limit`` of its train split). ``device``: where
    the GMN trains (graph batches are built on the host and copied there)."""
    from torch_geometric.data import Batch

    from metanet.nn import GMN
    from tasks.learn.metrics import fit_regression
    from tasks.learn.train import _to

    roots = [Path(r) for r in roots]
    node_dim, edge_dim = _widths(roots)
    train = _graphs(roots, "train", node_dim, edge_dim, limit)
    val, test = (_graphs(roots, s, node_dim, edge_dim) for s in ("val", "test"))
    y_train = torch.cat([g.y for g in train])
    torch.manual_seed(seed)
    model = GMN(node_dim, edge_dim, hidden=hidden, layers=3, out_features=1)
    device = torch.device(device) if device is not None else None
    if device is not None:
        model.to(device)
    y_val = torch.cat([g.y for g in val])

    def predict(idx: Tensor) -> Tensor:
        batch = Batch.from_data_list([train[i] for i in idx.tolist()])
        return model(_to(batch, device)).reshape(-1)

    def validate() -> dict[str, float]:
        return {"val_kendall_tau": _tau(_predict(model, val, device=device), y_val)}

    best, history, seconds = fit_regression(
        model, len(train), predict, y_train, validate, epochs=epochs, patience=patience,
        batch_size=batch_size, lr=lr, seed=seed, device=device,
    )  # fmt: skip
    p = _predict(model, test, device=device)
    y = torch.cat([g.y for g in test])
    fam = torch.cat([g.family for g in test])
    per = {r.name: _tau(p[fam == k], y[fam == k]) for k, r in enumerate(roots)}
    return MixedResult(
        _tau(p, y), best.value, per, best.epoch, len(history), seconds, history,
    )  # fmt: skip
