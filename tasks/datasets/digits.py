"""Real data that ships with scikit-learn: the 8×8 digits (1,797 images, 10 classes).

Small models and a deterministic training loop on it, shared by the alignment example,
benchmarks and tests (and by the task families of later tasks). Nothing downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Digits", "load", "mlp", "small_cnn", "train", "batches"]


@dataclass
class Digits:
    """Train/test split: images ``(n, 1, 8, 8)`` scaled to [0, 1] and standardized, labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def flat(self) -> Digits:
        return Digits(self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test)


def load(test_fraction: float = 0.25, seed: int = 0, dtype=torch.float32) -> Digits:
    """scikit-learn's digits, split once by ``seed`` (stratification not needed at 180/class)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Digits(x[train], y[train], x[test], y[test])


def mlp(width: int = 512, depth: int = 3, inputs: int = 64, classes: int = 10) -> nn.Sequential:
    """``depth`` hidden ReLU layers of ``width`` units."""
    layers: list[nn.Module] = []
    prev = inputs
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, classes))
    return nn.Sequential(*layers)


def small_cnn(width: int = 32, classes: int = 10, norm: str | None = None) -> nn.Sequential:
    """Three 3×3 conv layers (the third stride 2), global average pool, linear head."""

    def block(cin, cout, stride):
        out = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=norm is None)]
        if norm == "batch":
            out.append(nn.BatchNorm2d(cout))
        return [*out, nn.ReLU()]

    return nn.Sequential(
        *block(1, width, 1),
        *block(width, 2 * width, 1),
        *block(2 * width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def batches(x: Tensor, y: Tensor, size: int = 256) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def train(
    model: nn.Module,
    data: Digits,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Adam on the training split, shuffled by ``seed``; returns the model (in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    n = len(data.y_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main_job_models(kind: str, data: Digits, n_models: int, epochs: int = 15) -> list[nn.Module]:
    """The main job's networks (``examples/align_and_merge.py``): ``n_models`` of ``kind``
    (``"mlp"``: 512 wide, 3 layers, on ``data.flat()``; ``"cnn"``: 32 channels), model
    ``i`` seeded by ``i``. ``data`` is the split they train on (flat for the MLPs)."""
    if kind not in ("mlp", "cnn"):
        raise ValueError(f"kind must be 'mlp' or 'cnn', got {kind!r}")
    models = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        model = mlp(512, 3) if kind == "mlp" else small_cnn(32)
        lr = 1e-3 if kind == "mlp" else 3e-3
        models.append(train(model, data, epochs=epochs, lr=lr, batch_size=128, seed=seed))
    return models
