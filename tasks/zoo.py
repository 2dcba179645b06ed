"""A zoo of small CNNs trained on scikit-learn's digits, for generalization prediction.

Every model has the same architecture (:func:`zoo_cnn`: conv 1→8 3×3, ReLU, conv 8→8 3×3
stride 2, ReLU, global average pool, linear 8→10; 754 parameters), so the weights stack.
What varies, drawn per model from its own seed, is how it is trained: Adam learning rate
(log-uniform), init scale (a factor on PyTorch's default ``U(±1/√fan_in)``), decoupled
weight decay, number of steps, batch size and a fraction of noisy training labels. The
test accuracies spread from chance to ~98%; predicting them from the weights is the
generalization-prediction task (Unterthiner et al. 2020; NFN, GMN report Kendall τ).

Many models train at once as one batched network: the convolutions are grouped
convolutions with one group per model, each model reads its own mini-batches, and Adam is
applied per model (its own learning rate, weight decay and step count), so every model
trains as it would alone (up to floating-point order). Models that reach their step count
leave the batch, so the cost is the sum of the models' steps.

Storage is :mod:`tasks.inr`'s: ``dataset.json``, ``space.json`` (the WeightSpace of one
CNN, from :func:`converters.from_module`), and shards of stacked tensors whose metadata
holds the index rows (hyperparameters, ``accuracy``, ``train_loss``, ``split``, and
``label``: the accuracy decile, so classifiers can run on the zoo too). Shards are written
atomically; a rerun skips finished ones; the same seed gives bit-identical shards.
:class:`tasks.inr.WeightDataset` reads the folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metanet.io import atomic_write
from tasks.inr import _save_shard, _shard_path, _write_json

__all__ = ["zoo_cnn", "zoo_space", "sample_hparams", "train_cnns", "make_zoo", "accuracy"]

WIDTH = 8
CLASSES = 10
BATCH_SIZES = (32, 64, 128)


def zoo_cnn() -> nn.Sequential:
    """The zoo's architecture; its ``state_dict`` keys are the dataset's tensor names."""
    return nn.Sequential(
        nn.Conv2d(1, WIDTH, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(WIDTH, CLASSES),
    )


NAMES = ("0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias")


def zoo_space():
    """The WeightSpace of one zoo CNN (hidden channels of each conv permute)."""
    from converters import from_module

    return from_module(zoo_cnn(), torch.zeros(1, 1, 8, 8))


@dataclass
class HParams:
    seed: int
    lr: float
    init_scale: float
    weight_decay: float
    steps: int
    batch_size: int
    label_noise: float


def sample_hparams(seed: int) -> HParams:
    """One model's training recipe, drawn from ``seed`` alone."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(6, generator=g, dtype=torch.float64).tolist()

    def log_uniform(x: float, lo: float, hi: float) -> float:
        return float(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))))

    return HParams(
        seed=int(seed),
        lr=round(log_uniform(u[0], 3e-4, 5e-2), 8),
        init_scale=round(log_uniform(u[1], 0.25, 4.0), 6),
        weight_decay=round(log_uniform(u[2], 1e-6, 3e-1) if u[2] > 0.2 else 0.0, 8),
        steps=int(round(log_uniform(u[3], 50, 3000))),
        batch_size=BATCH_SIZES[min(len(BATCH_SIZES) - 1, int(u[4] * len(BATCH_SIZES)))],
        label_noise=round(0.6 * u[5], 4),
    )


def _init(hp: HParams) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(hp.seed * 7919 + 1)
    out = {}
    for name, mod in zip(NAMES[::2], (zoo_cnn()[0], zoo_cnn()[2], zoo_cnn()[6])):
        fan_in = mod.weight[0].numel()
        bound = hp.init_scale / math.sqrt(fan_in)
        out[name] = (torch.rand(mod.weight.shape, generator=g) * 2 - 1) * bound
        out[name.replace("weight", "bias")] = (
            torch.rand(mod.bias.shape, generator=g) * 2 - 1
        ) * bound
    return out


def _forward(w: dict[str, Tensor], x: Tensor) -> Tensor:
    """``B`` stacked CNNs on ``x (N, B, 8, 8)`` (model b reads channel b) -> ``(N, B, 10)``."""
    b = w["0.weight"].shape[0]
    h = F.conv2d(x, w["0.weight"].flatten(0, 1), w["0.bias"].flatten(), padding=1, groups=b)
    h = F.relu(h)
    h = F.conv2d(
        h, w["2.weight"].flatten(0, 1), w["2.bias"].flatten(), stride=2, padding=1, groups=b
    )
    h = F.relu(h).mean((-2, -1)).unflatten(1, (b, WIDTH))  # (N, B, 8)
    return torch.einsum("nbi,boi->nbo", h, w["6.weight"]) + w["6.bias"]


def _bc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1))


def train_cnns(hps: list[HParams], data, progress: bool = False) -> dict[str, Tensor]:
    """Train one CNN per recipe (all the same batch size), together. Returns stacked weights.

    Each model draws its mini-batches (with replacement) and its noisy labels from its own
    generator; Adam (β 0.9/0.999, ε 1e-8) with decoupled weight decay, per model."""
    if len({h.batch_size for h in hps}) != 1:
        raise ValueError("train_cnns trains models of one batch size at a time")
    n_b, bs = len(hps), hps[0].batch_size
    inits = [_init(h) for h in hps]
    w = {k: torch.stack([i[k] for i in inits]) for k in NAMES}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v2 = {k: torch.zeros_like(v) for k, v in w.items()}
    x_train, y_train = data.x_train[:, 0], data.y_train
    n = len(y_train)
    gens, labels = [], []
    for h in hps:
        g = torch.Generator().manual_seed(h.seed * 7919 + 2)
        noisy = torch.rand(n, generator=g) < h.label_noise
        y = torch.where(noisy, torch.randint(0, CLASSES, (n,), generator=g), y_train)
        labels.append(y)
        gens.append(g)
    labels_t = torch.stack(labels)  # (B, n)
    lr = torch.tensor([h.lr for h in hps])
    wd = torch.tensor([h.weight_decay for h in hps])
    steps = torch.tensor([h.steps for h in hps])
    live = torch.arange(n_b)  # positions (in hps) of the models still training
    final = {k: torch.empty_like(v) for k, v in w.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    it = range(int(steps.max()))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"training {n_b} CNNs (batch {bs})", unit="step", leave=False)
    for t in it:
        done = steps[live] <= t
        if done.any():  # models that finished leave the batch
            keep = ~done
            for k in NAMES:
                final[k][live[done]] = w[k][done]
                w[k], m[k], v2[k] = w[k][keep], m[k][keep], v2[k][keep]
            live = live[keep]
        idx = torch.stack([torch.randint(0, n, (bs,), generator=gens[int(i)]) for i in live], 1)
        x = x_train[idx]  # (N, B, 8, 8)
        y = labels_t[live[None, :], idx]  # (N, B)
        params = {k: v.requires_grad_() for k, v in w.items()}
        logits = _forward(params, x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / bs
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            lr_l, wd_l = lr[live], wd[live]
            for k, g in zip(NAMES, grads):
                p = w[k].detach()
                m[k].mul_(b1).add_(g, alpha=1 - b1)
                v2[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                p = p * (1 - _bc(lr_l * wd_l, p))
                p = p - _bc(lr_l, p) * (m[k] / c1) / ((v2[k] / c2).sqrt() + eps)
                w[k] = p
    for k in NAMES:
        if len(live):
            final[k][live] = w[k].detach()
    return final


@torch.no_grad()
def accuracy(w: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-model accuracy and mean cross-entropy of stacked weights on ``x (n, 1, 8, 8)``."""
    b = w["0.weight"].shape[0]
    logits = _forward(w, x[:, 0, None].expand(-1, b, -1, -1))  # (n, B, 10)
    acc = (logits.argmax(-1) == y[:, None]).double().mean(0)
    ce = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, b), reduction="none")
    return acc, ce.double().mean(0)


def _split(n: int, seed: int, val: float, test: float) -> list[str]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(test * n), round(val * n)
    out = [""] * n
    for k, i in enumerate(order):
        out[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


def make_zoo(
    root: str | os.PathLike,
    n: int = 1000,
    *,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    num_shards: int = 4,
    val: float = 0.1,
    test: float = 0.2,
    max_steps: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train ``n`` zoo CNNs (model ``i`` seeded by ``seed * 1_000_003 + i``) and store them.

    ``shard=(i, num_shards)`` makes only shard ``i``; existing shards are skipped (resume).
    ``max_steps`` caps every model's step count (quick zoos for tests). Training runs on
    one thread (restored afterwards): CPU kernels' reduction order depends on the thread
    count, and one thread makes every shard bit-identical on any machine; run shards in
    parallel processes (``--shard``) to use more cores. Returns the shard paths written or found."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_zoo(root, n, seed, shard, num_shards, val, test, max_steps, progress)
    finally:
        torch.set_num_threads(threads)


def _make_zoo(root, n, seed, shard, num_shards, val, test, max_steps, progress) -> list[Path]:
    from tasks import digits

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "cnn_zoo",
        "n": n,
        "seed": seed,
        "num_shards": num_shards,
        "val": val,
        "test": test,
        "architecture": "conv1-8 3x3, relu, conv8-8 3x3 s2, relu, avgpool, linear8-10",
        "source": "sklearn.datasets.load_digits (tasks.digits.load(0.25, seed=0))",
    }
    if max_steps is not None:
        meta["max_steps"] = max_steps
    _write_json(root / "dataset.json", meta, check_same=True)
    space_path = root / "space.json"
    if not space_path.exists():
        atomic_write(space_path, lambda tmp: Path(tmp).write_text(zoo_space().to_json(2)))
    if shard is not None and shard[1] != num_shards:
        raise ValueError(f"--shard {shard[0]}/{shard[1]}: this zoo has {num_shards} shards")
    data = digits.load(0.25, seed=0)
    splits = _split(n, seed, val, test)
    wanted = [shard[0]] if shard is not None else range(num_shards)
    per_shard = math.ceil(n / num_shards)
    paths = []
    for s in wanted:
        path = _shard_path(root, s, num_shards)
        paths.append(path)
        if path.exists():
            continue
        ids = list(range(s * per_shard, min(n, (s + 1) * per_shard)))
        hps = [sample_hparams(seed * 1_000_003 + i) for i in ids]
        if max_steps is not None:
            hps = [replace(h, steps=min(h.steps, max_steps)) for h in hps]
        stacked = (
            {k: torch.empty(len(ids), *t.shape) for k, t in _init(hps[0]).items()} if ids else {}
        )
        for bs in BATCH_SIZES:
            pos = [j for j, h in enumerate(hps) if h.batch_size == bs]
            if not pos:
                continue
            w = train_cnns([hps[j] for j in pos], data, progress)
            for k in NAMES:
                stacked[k][pos] = w[k]
        rows = []
        if ids:
            acc, _ = accuracy(stacked, data.x_test, data.y_test)
            _, loss = accuracy(stacked, data.x_train, data.y_train)
            for j, i in enumerate(ids):
                a = float(acc[j])
                rows.append(
                    {
                        "model": i,
                        "split": splits[i],
                        "accuracy": round(a, 6),
                        "train_loss": round(float(loss[j]), 6),
                        "label": min(CLASSES - 1, int(a * CLASSES)),
                        **asdict(hps[j]),
                    }
                )
        tensors = {k: v.contiguous() for k, v in stacked.items()}
        _save_shard(path, tensors, rows)
        if progress and rows:
            mean = sum(r["accuracy"] for r in rows) / len(rows)
            print(f"wrote {path.name}: {len(rows)} CNNs, mean test accuracy {mean:.3f}")
    return paths
