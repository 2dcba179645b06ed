"""Zoos of small CNNs trained on scikit-learn's digits, for generalization prediction.

A zoo *family* is one architecture (:class:`Family`: ``depth`` 3×3 convolutions of
``width`` channels, the first at stride 1 and the rest at stride 2, each followed by the
model's activation, then global average pooling and a linear layer to the 10 classes), so
a family's weights stack. What varies, drawn per model from its own seed, is how it is
trained: Adam learning rate (log-uniform), init scale (a factor on PyTorch's default
``U(±1/√fan_in)``), decoupled weight decay, number of steps, batch size, a fraction of
noisy training labels and, in a varied family, the activation (ReLU, tanh or GELU, as
Unterthiner et al. vary theirs). The test accuracies spread from chance to ~98%;
predicting them from the weights is the generalization-prediction task (Unterthiner et
al. 2020; NFN, GMN report Kendall τ).

* :func:`make_zoo` — one family (the default, :data:`BASE`: conv 1→8, conv 8→8 stride 2,
  ReLU, 754 parameters): the original zoo.
* :func:`make_varied_zoo` — the larger zoo: several families (:data:`VARIED`: depths 2–3,
  widths 6–8), each a sub-folder readable by :class:`tasks.datasets.inr.WeightDataset`, every
  model with its own activation.

Many models train at once as one batched network: the convolutions are grouped
convolutions with one group per model, each model reads its own mini-batches, and Adam is
applied per model (its own learning rate, weight decay and step count), so every model
trains as it would alone (up to floating-point order). Models that reach their step count
leave the batch, so the cost is the sum of the models' steps.

Storage is :mod:`tasks.datasets.inr`'s: ``dataset.json``, ``space.json`` (the WeightSpace of one
CNN, from :func:`converters.from_module`), and shards of stacked tensors whose metadata
holds the index rows (hyperparameters, ``accuracy``, ``train_loss``, ``split``, and
``label``: the accuracy decile, so classifiers can run on the zoo too). Shards are written
atomically; a rerun skips finished ones; the same seed gives bit-identical shards.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metanet.io import atomic_write
from tasks.datasets.inr import _save_shard, _shard_path, _write_json, check_dataset_folder

__all__ = [
    "Family",
    "BASE",
    "VARIED",
    "ACTIVATIONS",
    "zoo_cnn",
    "zoo_space",
    "sample_hparams",
    "train_cnns",
    "train_stacked",
    "make_zoo",
    "make_varied_zoo",
    "accuracy",
]

CLASSES = 10
BATCH_SIZES = (32, 64, 128)
ACTIVATIONS = ("relu", "tanh", "gelu")
_ACT_FN = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}
_ACT_MODULE = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass(frozen=True)
class Family:
    """One zoo architecture: ``depth`` 3×3 convs (stride 1, then 2) of ``width`` channels.

    ``activations`` are the ones its models draw from (one: every model uses it);
    ``steps`` the (log-uniform) range of training steps and ``batch_sizes`` the choices
    of its recipes."""

    name: str
    depth: int
    width: int
    activations: tuple[str, ...] = ("relu",)
    steps: tuple[int, int] = (50, 3000)
    batch_sizes: tuple[int, ...] = BATCH_SIZES

    def module(self, activation: str | None = None) -> nn.Sequential:
        """The architecture as a module; its ``state_dict`` keys are the tensor names."""
        act = _ACT_MODULE[activation or self.activations[0]]
        mods: list[nn.Module] = []
        for k in range(self.depth):
            c_in = 1 if k == 0 else self.width
            mods += [nn.Conv2d(c_in, self.width, 3, stride=1 if k == 0 else 2, padding=1), act()]
        return nn.Sequential(
            *mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.width, CLASSES)
        )

    @property
    def layers(self) -> list[str]:
        """Module prefixes of the weighted layers, in order (convs, then the linear)."""
        return [str(2 * k) for k in range(self.depth)] + [str(2 * self.depth + 2)]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{p}.{s}" for p in self.layers for s in ("weight", "bias"))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module().parameters())

    def describe(self) -> str:
        convs = ", ".join(
            f"conv{1 if k == 0 else self.width}-{self.width} 3x3{' s2' if k else ''}"
            for k in range(self.depth)
        )
        return f"{convs}, {'/'.join(self.activations)}, avgpool, linear{self.width}-{CLASSES}"


BASE = Family("base", 2, 8)
# the larger zoo: depth, width and (per model) activation vary; shorter runs on smaller
# batches than the original's keep its cost in check (test accuracies still span 10-97%)
_SHORT = {"steps": (20, 600), "batch_sizes": (16, 32, 64)}
VARIED = (
    Family("d2w8", 2, 8, ACTIVATIONS, **_SHORT),
    Family("d3w8", 3, 8, ACTIVATIONS, **_SHORT),
    Family("d2w6", 2, 6, ACTIVATIONS, **_SHORT),
    Family("d3w6", 3, 6, ACTIVATIONS, **_SHORT),
)


def zoo_cnn(family: Family = BASE, activation: str | None = None) -> nn.Sequential:
    """A zoo architecture (default: the original zoo's) as a module."""
    return family.module(activation)


NAMES = BASE.names


def zoo_space(family: Family = BASE):
    """The WeightSpace of one CNN of ``family`` (hidden channels of each conv permute).

    A family whose models draw different activations shares only the permutations: the
    groups' activation actions (ReLU's positive scaling, tanh's sign flips) are dropped."""
    from converters import from_module

    space = from_module(family.module(), torch.zeros(1, 1, 8, 8))
    if len(family.activations) == 1:
        return space
    groups = {n: replace(g, action=None) for n, g in space.groups.items()}
    note = f"activation varies per model ({', '.join(family.activations)}): permutations only"
    return replace(space, groups=groups, notes=space.notes + (note,))


@dataclass
class HParams:
    seed: int
    lr: float
    init_scale: float
    weight_decay: float
    steps: int
    batch_size: int
    label_noise: float
    activation: str = "relu"


def sample_hparams(seed: int, family: Family | None = None) -> HParams:
    """One model's training recipe for ``family`` (default :data:`BASE`), from ``seed`` alone.

    With several activations the model's own is drawn too (from a second stream, so the
    other fields do not depend on it)."""
    family = family or BASE
    activations, bss = family.activations, family.batch_sizes
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(6, generator=g, dtype=torch.float64).tolist()

    def log_uniform(x: float, lo: float, hi: float) -> float:
        return float(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))))

    act = activations[0]
    if len(activations) > 1:
        g2 = torch.Generator().manual_seed(int(seed) * 31 + 17)
        act = activations[int(torch.randint(len(activations), (1,), generator=g2))]
    return HParams(
        seed=int(seed),
        lr=round(log_uniform(u[0], 3e-4, 5e-2), 8),
        init_scale=round(log_uniform(u[1], 0.25, 4.0), 6),
        weight_decay=round(log_uniform(u[2], 1e-6, 3e-1) if u[2] > 0.2 else 0.0, 8),
        steps=int(round(log_uniform(u[3], *family.steps))),
        batch_size=bss[min(len(bss) - 1, int(u[4] * len(bss)))],
        label_noise=round(0.6 * u[5], 4),
        activation=act,
    )


def _init(hp: HParams, family: Family = BASE) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(hp.seed * 7919 + 1)
    model = family.module()
    out = {}
    for prefix in family.layers:
        mod = model.get_submodule(prefix)
        fan_in = mod.weight[0].numel()
        bound = hp.init_scale / math.sqrt(fan_in)
        out[f"{prefix}.weight"] = (torch.rand(mod.weight.shape, generator=g) * 2 - 1) * bound
        out[f"{prefix}.bias"] = (torch.rand(mod.bias.shape, generator=g) * 2 - 1) * bound
    return out


def _activate(h: Tensor, acts: tuple[str, ...], width: int) -> Tensor:
    """Each model's own activation on ``h (N, B * width, ...)`` (model b: channels of b).

    One call per run of equal activations along the models (sort the models by
    activation and it is one call per activation)."""
    runs: list[list] = []
    for a in acts:
        if runs and runs[-1][0] == a:
            runs[-1][1] += width
        else:
            runs.append([a, width])
    if len(runs) == 1:
        return _ACT_FN[runs[0][0]](h)
    parts = h.split([n for _, n in runs], dim=1)
    return torch.cat([_ACT_FN[a](p) for (a, _), p in zip(runs, parts)], dim=1)


def _forward(
    w: dict[str, Tensor],
    x: Tensor,
    family: Family = BASE,
    acts: tuple[str, ...] | None = None,
) -> Tensor:
    """``B`` stacked CNNs on ``x (N, B, 8, 8)`` (model b reads channel b) -> ``(N, B, 10)``.

    ``acts`` names each model's activation (default: the family's first)."""
    first = family.layers[0]
    b = w[f"{first}.weight"].shape[0]
    acts = acts or (family.activations[0],) * b
    h = x
    for k, prefix in enumerate(family.layers[:-1]):
        h = F.conv2d(
            h,
            w[f"{prefix}.weight"].flatten(0, 1),
            w[f"{prefix}.bias"].flatten(),
            stride=1 if k == 0 else 2,
            padding=1,
            groups=b,
        )
        h = _activate(h, acts, family.width)
    h = h.mean((-2, -1)).unflatten(1, (b, family.width))  # (N, B, width)
    last = family.layers[-1]
    return torch.einsum("nbi,boi->nbo", h, w[f"{last}.weight"]) + w[f"{last}.bias"]


def _bc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1))


@torch.no_grad()
def adamw_step_(
    w: dict[str, Tensor],
    m: dict[str, Tensor],
    v: dict[str, Tensor],
    grads: dict[str, Tensor],
    t: int,
    lr: Tensor,
    wd: Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """Step ``t`` (from 0) of Adam with decoupled weight decay on stacked weights, each
    model (leading axis) with its own ``lr`` and ``wd``: the moments ``m``/``v`` in place,
    ``w``'s entries replaced. The zoos' trainers share it."""
    b1, b2 = betas
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    for k, g in grads.items():
        p = w[k].detach()
        m[k].mul_(b1).add_(g, alpha=1 - b1)
        v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
        p = p * (1 - _bc(lr * wd, p))
        w[k] = p - _bc(lr, p) * (m[k] / c1) / ((v[k] / c2).sqrt() + eps)


def train_stacked(
    inits: list[dict[str, Tensor]],
    hps: list,
    y_train: Tensor,
    loss_fn: Callable[[dict[str, Tensor], Tensor, Tensor, Tensor], Tensor],
    device: torch.device,
    desc: str | None = None,
) -> dict[str, Tensor]:
    """Train stacked models together, each on its own recipe: what the zoos share.

    ``inits``: each model's initial weights; ``hps``: their recipes (``seed``, ``lr``,
    ``weight_decay``, ``steps``, ``label_noise`` and one common ``batch_size``). Each model
    draws its noisy labels and its mini-batches (with replacement) from its own generator,
    on the CPU, so a recipe draws the same ones on every device, and has its own Adam
    (β 0.9/0.999, ε 1e-8) with decoupled weight decay (:func:`adamw_step_`). A model leaves
    the batch after its ``steps``; which ones train is decided on the host from the step
    counts: no per-step sync.

    ``loss_fn(params, live, idx, y)``: the summed loss of the live models (``live``: their
    positions in ``hps``, on the host) on the training examples ``idx`` ``(B, batch)``
    with labels ``y`` ``(B, batch)`` (both on ``device``), divided by the batch size.
    ``desc``: a progress bar's label (none without). Returns the stacked final weights
    ``{name: (len(hps), *shape)}`` on ``device``."""
    if len({h.batch_size for h in hps}) != 1:
        raise ValueError("models of one batch size train together (one call per batch size)")
    names = list(inits[0])
    w = {k: torch.stack([i[k] for i in inits]).to(device) for k in names}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v2 = {k: torch.zeros_like(v) for k, v in w.items()}
    n, bs = len(y_train), hps[0].batch_size
    gens, labels = [], []
    for h in hps:
        g = torch.Generator().manual_seed(h.seed * 7919 + 2)
        noisy = torch.rand(n, generator=g) < h.label_noise
        labels.append(torch.where(noisy, torch.randint(0, CLASSES, (n,), generator=g), y_train))
        gens.append(g)
    labels_t = torch.stack(labels).to(device)  # (B, n)
    lr = torch.tensor([h.lr for h in hps], device=device)
    wd = torch.tensor([h.weight_decay for h in hps], device=device)
    steps = torch.tensor([h.steps for h in hps])  # on the host: it steers the loop
    live = torch.arange(len(hps))  # positions (in hps) of the models still training
    final = {k: torch.empty_like(v) for k, v in w.items()}
    it = range(int(steps.max()))
    if desc is not None:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="step", leave=False)
    for t in it:
        done = steps[live] <= t
        if done.any():  # models that finished leave the batch
            # positions as indices made on the host (a mask would be read back on a GPU)
            keep = (~done).nonzero().squeeze(1).to(device)
            ended = done.nonzero().squeeze(1).to(device)
            gone = live[done].to(device)
            for k in names:
                final[k][gone] = w[k][ended]
                w[k], m[k], v2[k] = w[k][keep], m[k][keep], v2[k][keep]
            live = live[~done]
        idx = torch.stack([torch.randint(0, n, (bs,), generator=gens[int(i)]) for i in live])
        rows, idx = live.to(device), idx.to(device)
        params = {k: v.requires_grad_() for k, v in w.items()}
        loss = loss_fn(params, live, idx, labels_t[rows[:, None], idx])
        grads = torch.autograd.grad(loss, list(params.values()))
        adamw_step_(w, m, v2, dict(zip(names, grads)), t, lr[rows], wd[rows])
    for k in names:
        if len(live):
            final[k][live.to(device)] = w[k].detach()
    return final


def train_cnns(
    hps: list[HParams],
    data,
    progress: bool = False,
    family: Family = BASE,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Train one ``family`` CNN per recipe (all the same batch size), together, each with
    its own activation (:func:`train_stacked`). Returns the stacked weights (on ``device``,
    default the CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    bad = {h.activation for h in hps} - set(family.activations)
    if bad:
        raise ValueError(f"family {family.name!r} has activations {family.activations}, not {bad}")
    x_train = data.x_train[:, 0].to(device)

    def loss_fn(params, live, idx, y):
        acts = tuple(hps[int(i)].activation for i in live)
        logits = _forward(params, x_train[idx.T], family, acts)  # (batch, B, 10)
        return F.cross_entropy(logits.flatten(0, 1), y.T.flatten(), reduction="sum") / len(y[0])

    desc = f"training {len(hps)} {family.name} CNNs (batch {hps[0].batch_size})"
    inits = [_init(h, family) for h in hps]
    return train_stacked(inits, hps, data.y_train, loss_fn, device, desc if progress else None)


@torch.no_grad()
def accuracy(
    w: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    family: Family = BASE,
    acts: tuple[str, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-model accuracy and mean cross-entropy of stacked weights on ``x (n, 1, 8, 8)``."""
    b = w[family.names[0]].shape[0]
    logits = _forward(w, x[:, 0, None].expand(-1, b, -1, -1), family, acts)  # (n, B, 10)
    acc = (logits.argmax(-1) == y[:, None]).double().mean(0)
    ce = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(-1, b), reduction="none")
    return acc, ce.double().mean(0)


@torch.no_grad()
def _split(n: int, seed: int, val: float, test: float) -> list[str]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(test * n), round(val * n)
    out = [""] * n
    for k, i in enumerate(order):
        out[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


def _one_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


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
    family: Family = BASE,
    device: str | torch.device | None = None,
) -> list[Path]:
    """Train ``n`` zoo CNNs (model ``i`` seeded by ``seed * 1_000_003 + i``) and store them.

    ``shard=(i, num_shards)`` makes only shard ``i``; existing shards are skipped (resume).
    ``max_steps`` caps every model's step count (quick zoos for tests). Training runs on
    one thread (restored afterwards): CPU kernels' reduction order depends on the thread
    count, and one thread makes every shard bit-identical on any machine; run shards in
    parallel processes (``--shard``) to use more cores. ``device``: where the CNNs train
    (a GPU's kernels are not the CPU's: its zoo is not bit-identical to a CPU one). Returns
    the shard paths written or found."""
    return _one_thread(
        _make_zoo, Path(root), n, seed, shard, num_shards, val, test, max_steps, progress, family,
        0, device,
    )  # fmt: skip


def make_varied_zoo(
    root: str | os.PathLike,
    n: int = 1300,
    *,
    families: tuple[Family, ...] = VARIED,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    num_shards: int = 8,
    val: float = 0.1,
    test: float = 0.2,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict[str, list[Path]]:
    """The larger zoo: ``n`` CNNs of each of ``families``, in ``root/<family name>/``.

    Each sub-folder is a :func:`make_zoo` dataset of its own (one WeightSpace; model ``i``
    of family ``k`` seeded by ``seed * 1_000_003 + 10_000_000 * (k + 1) + i``).
    ``shard=(i, num_shards)`` makes shard ``i`` of every family, so ``num_shards``
    processes together make the whole zoo; reruns resume and are bit-identical.
    Returns ``{family name: shard paths}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "cnn_zoo_families",
        "families": [asdict(f) for f in families],
        "n": n,
        "seed": seed,
        "num_shards": num_shards,
    }
    _write_json(root / "zoo.json", json.loads(json.dumps(meta)), check_same=True)  # tuples: lists
    out = {}
    for k, fam in enumerate(families):
        offset = 10_000_000 * (k + 1)
        out[fam.name] = _one_thread(
            _make_zoo,
            root / fam.name,
            n,
            seed,
            shard,
            num_shards,
            val,
            test,
            max_steps,
            progress,
            fam,
            offset,
        )
    return out


def _make_zoo(
    root: Path, n, seed, shard, num_shards, val, test, max_steps, progress, family, offset=0,
    device=None,
) -> list[Path]:  # fmt: skip
    from tasks.datasets import digits

    check_dataset_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "cnn_zoo",
        "n": n,
        "seed": seed,
        "num_shards": num_shards,
        "val": val,
        "test": test,
        "architecture": family.describe(),
        "source": "sklearn.datasets.load_digits (tasks.datasets.digits.load(0.25, seed=0))",
    }
    if family != BASE:
        meta["family"] = asdict(family)
        meta["seed_offset"] = offset
    if max_steps is not None:
        meta["max_steps"] = max_steps
    _write_json(root / "dataset.json", json.loads(json.dumps(meta)), check_same=True)
    space_path = root / "space.json"
    if not space_path.exists():
        atomic_write(space_path, lambda tmp: Path(tmp).write_text(zoo_space(family).to_json(2)))
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
        hps = [sample_hparams(seed * 1_000_003 + offset + i, family) for i in ids]
        if max_steps is not None:
            hps = [replace(h, steps=min(h.steps, max_steps)) for h in hps]
        shapes = {k: t.shape for k, t in family.module().state_dict().items()}
        stacked = {k: torch.empty(len(ids), *shape) for k, shape in shapes.items()}
        for bs in sorted({h.batch_size for h in hps}):
            # sorted by activation: one activation call per kind in the batched forward
            pos = sorted(
                (j for j, h in enumerate(hps) if h.batch_size == bs),
                key=lambda j: (hps[j].activation, j),
            )
            w = train_cnns([hps[j] for j in pos], data, progress, family, device)
            for k in family.names:
                stacked[k][pos] = w[k].cpu()
        rows = []
        if ids:
            acts = tuple(h.activation for h in hps)
            acc, _ = accuracy(stacked, data.x_test, data.y_test, family, acts)
            _, loss = accuracy(stacked, data.x_train, data.y_train, family, acts)
            for j, i in enumerate(ids):
                a = float(acc[j])
                row = {
                    "model": i,
                    "split": splits[i],
                    "accuracy": round(a, 6),
                    "train_loss": round(float(loss[j]), 6),
                    "label": min(CLASSES - 1, int(a * CLASSES)),
                    **asdict(hps[j]),
                }
                if family == BASE:  # the original zoo's rows, unchanged
                    del row["activation"]
                rows.append(row)
        tensors = {k: v.contiguous() for k, v in stacked.items()}
        _save_shard(path, tensors, rows)
        if progress and rows:
            mean = sum(r["accuracy"] for r in rows) / len(rows)
            print(f"wrote {root.name}/{path.name}: {len(rows)} CNNs, mean test accuracy {mean:.3f}")
    return paths
