"""Task families for meta-training and evaluating learned optimizers.

A :class:`Task` is one network to train: an architecture (used through
``torch.func.functional_call``), its WeightSpace, its initial weights and a stream of
minibatches, all fixed by ``(family, width, seed)``. A :class:`Family` draws tasks with
randomized seed and width; ``held_out_width`` is a width meta-training never sees.

* ``mlp`` — a two-hidden-layer ReLU MLP on scikit-learn's 8×8 digits;
* ``cnn`` — a small CNN (two 3×3 convolutions, global average pool, linear) on digits;
* ``lm`` — a character-level neural language model (embeddings of the previous 6
  characters → ReLU layer → next character) on text generated from a small grammar.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metanet.space import WeightSpace

__all__ = ["Task", "Family", "FAMILIES", "family", "generated_text"]


@dataclass
class Task:
    """One network to train: ``init`` weights, ``batch(step)`` and ``loss(weights, batch)``."""

    family: str
    width: int
    seed: int
    model: nn.Module = field(repr=False)
    space: WeightSpace = field(repr=False)
    x: Tensor = field(repr=False)
    y: Tensor = field(repr=False)
    batch_size: int = 128

    def init(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The initial weights (PyTorch's default init, seeded by the task)."""
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left alone
            torch.manual_seed(self.seed)
            for m in self.model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return {k: v.detach().clone().to(dtype) for k, v in self.model.named_parameters()}

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The minibatch of ``step`` (a fixed function of the task seed and the step, drawn
        on the CPU: the same batches on every device)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        i = torch.randint(len(self.y), (self.batch_size,), generator=g).to(self.x.device)
        return self.x[i], self.y[i]

    def to(self, device: str | torch.device | None) -> Task:
        """The task with its model and data on ``device`` (the model copied: architectures
        are shared between tasks)."""
        if device is None or torch.device(device) == self.x.device:
            return self
        import copy

        return replace(self, model=copy.deepcopy(self.model).to(device), x=self.x.to(device),
                       y=self.y.to(device))  # fmt: skip

    def loss(self, weights: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        dtype = next(iter(weights.values())).dtype
        if x.is_floating_point():
            x = x.to(dtype)
        out = torch.func.functional_call(self.model, weights, (x,))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class Family:
    """A distribution over tasks: random seed, width drawn from ``widths``."""

    name: str
    widths: tuple[int, ...]
    held_out_width: int

    def task(self, seed: int, width: int | None = None, device=None) -> Task:
        """The task of ``seed`` (its width drawn from ``widths`` unless given), on
        ``device`` (default the CPU)."""
        if width is None:
            width = random.Random(seed).choice(self.widths)
        return _build(self.name, width, seed).to(device)

    def sample(self, rng: random.Random, device=None) -> Task:
        return self.task(rng.randrange(2**31), device=device)


FAMILIES = {
    "mlp": Family("mlp", (16, 32), 48),
    "cnn": Family("cnn", (4, 8), 12),
    "lm": Family("lm", (32, 64), 96),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None


_GRAMMAR = {
    "S": [["NP", "VP", "."], ["NP", "VP", "PP", "."], ["the", "N", "is", "ADJ", "."]],
    "NP": [["the", "N"], ["a", "ADJ", "N"], ["the", "ADJ", "N"]],
    "VP": [["V", "NP"], ["V"], ["V", "the", "N"]],
    "PP": [["on", "NP"], ["with", "NP"], ["near", "NP"]],
    "N": [[w] for w in "cat dog bird fish mouse horse child teacher robot tree".split()],
    "V": [[w] for w in "sees chases likes finds eats follows draws helps".split()],
    "ADJ": [[w] for w in "small big red quick lazy happy old green".split()],
}


def generated_text(chars: int = 60_000, seed: int = 0) -> str:
    """English-like text from a small probabilistic grammar (no download, fixed by seed)."""
    rng = random.Random(seed)
    out: list[str] = []
    n = 0

    def expand(sym: str) -> None:
        nonlocal n
        if sym not in _GRAMMAR:
            out.append(sym)
            n += len(sym) + 1
            return
        for s in rng.choice(_GRAMMAR[sym]):
            expand(s)

    while n < chars:
        expand("S")
    return " ".join(out).replace(" .", ".")[:chars]


CONTEXT = 6


@lru_cache(maxsize=1)
def _lm_data() -> tuple[Tensor, Tensor, int]:
    text = generated_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    x = ids.unfold(0, CONTEXT, 1)[:-1]
    y = ids[CONTEXT:]
    return x, y, len(vocab)


@lru_cache(maxsize=2)
def _digits(flat: bool) -> tuple[Tensor, Tensor]:
    from tasks.datasets import digits

    d = digits.load()
    x = d.x_train.flatten(1) if flat else d.x_train
    return x, d.y_train


@lru_cache(maxsize=32)
def _architecture(name: str, width: int) -> tuple[nn.Module, WeightSpace]:
    from converters import from_module

    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 10),
        )  # fmt: skip
        example = torch.zeros(2, 64)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
        )  # fmt: skip
        example = torch.zeros(2, 1, 8, 8)
    elif name == "lm":
        vocab = _lm_data()[2]
        model = nn.Sequential(
            nn.Embedding(vocab, 16), nn.Flatten(), nn.Linear(CONTEXT * 16, width), nn.ReLU(),
            nn.Linear(width, vocab),
        )  # fmt: skip
        example = torch.zeros(2, CONTEXT, dtype=torch.long)
    else:
        raise ValueError(f"unknown task family {name!r}")
    return model, from_module(model, (example,))


def _build(name: str, width: int, seed: int) -> Task:
    model, space = _architecture(name, width)
    if name == "lm":
        x, y, _ = _lm_data()
    else:
        x, y = _digits(name == "mlp")
    return Task(name, width, seed, model, space, x, y)
