"""Train a metanetwork on a weight dataset: one loop for every model, 1 or N processes.

``train(kind, root, ...)`` fits an invariant classifier (INR classification: which digit
does this INR draw?) with any of metanet's models on a :class:`tasks.datasets.inr.WeightDataset`:

* ``unf`` — ``UNFLinear`` stack (full basis) → ``UNFPool`` → MLP head;
* ``nfn`` — the same with ``basis="nfn"`` (NFN's cheaper term subset);
* ``gmn`` — graph metanetwork on ``ParamGraph`` batches;
* ``transformer`` — :class:`metanet.nn.GraphTransformer`, attention over the same graphs
  (neurons as tokens, weights as attention biases and values; NG-T style);
* ``scalegmn`` — :class:`metanet.nn.ScaleGMN`, message passing equivariant to the sign
  and positive-scale actions as well (its weights are standardized by scale only);
* ``statnn`` / ``flat`` — the baselines.

Metrics go to ``out/metrics.jsonl`` (one line per epoch), curves to ``out/curves.png``,
the final model to ``out/model.safetensors`` (atomic). Under ``torchrun`` the loop runs
data-parallel (DDP, gloo on CPU): each of the ``W`` processes takes ``batch_size / W`` of
every global batch, in the order a single process would see them, so 1 and N processes
compute the same updates up to floating-point reduction order.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from metanet.io import CheckpointError, atomic_write
from metanet.space import WeightSpace
from tasks.learn.metrics import BestEpoch, cosine_schedule, kendall_tau

if TYPE_CHECKING:
    from tasks.datasets.inr import CoordAugment

__all__ = ["KINDS", "EXTERNAL_KINDS", "build_model", "train", "TrainResult", "TrainingDiverged"]

KINDS = ("unf", "nfn", "gmn", "transformer", "scalegmn", "statnn", "flat")
# models that read parameter graphs (the others read weight dicts)
GRAPH_KINDS = ("gmn", "transformer", "scalegmn")
# models invariant to the sign/scale actions too: their inputs are standardized by a scale
# only (a shift would break those symmetries), and sign-flip augmentation is a no-op
SCALE_KINDS = ("scalegmn",)
# the ``nfn`` package's own invariant networks (Zhou et al. 2023), for comparison; they
# need ``pip install nfn`` and an MLP-shaped space (``net.K.weight``/``net.K.bias`` pairs)
EXTERNAL_KINDS = ("nfn-np", "nfn-hnp")
# the models that Fourier-encode each weight value (``frequencies``)
ENCODING_KINDS = ("unf", "nfn", *EXTERNAL_KINDS)
# models whose output no permutation changes: permutation augmentation is a no-op for them
# (sign flips of odd-activation neurons do change their output)
PERMUTATION_INVARIANT_KINDS = (
    "unf",
    "nfn",
    "gmn",
    "transformer",
    "scalegmn",
    "statnn",
    "nfn-np",
    "nfn-hnp",
)


class _Encode(nn.Module):
    """Each weight value to channels ``[v, sin(2^k π v), cos(2^k π v)]`` (k < frequencies):
    ``(B, *shape) -> (B, 1 + 2 * frequencies, *shape)``. Elementwise, so it commutes with
    every permutation; it gives a linear layer the resolution a single read of the value
    lacks (GMN's ``FourierEncoding``; nfn's INR classifiers use Gaussian Fourier features)."""

    def __init__(self, frequencies: int = 0):
        super().__init__()
        from metanet.nn import FourierEncoding

        self.fourier = FourierEncoding(frequencies) if frequencies else None
        self.channels = 1 + 2 * frequencies

    def forward(self, v: Tensor) -> Tensor:
        if self.fourier is None:
            return v.unsqueeze(1)
        return self.fourier(v.unsqueeze(-1)).movedim(-1, 1)


class UNFClassifier(nn.Module):
    """Invariant UNF network: ``layers`` equivariant layers, pooling, an MLP head."""

    def __init__(
        self,
        space: WeightSpace,
        out: int,
        channels: int = 16,
        layers: int = 2,
        basis: str = "full",
        frequencies: int = 0,
    ):
        super().__init__()
        from metanet.nn import UNFLinear, UNFPointwise, UNFPool
        from metanet.probe import ProbeEncoder

        self.encode = _Encode(frequencies)
        # probe features (metanet.probe) enter through a per-neuron encoder (UNF would
        # fold their P values into channels) and an invariant DeepSets summary
        has_probes = any(t.role == "probe" for t in space.tensors.values())
        self.probes = ProbeEncoder(space, self.encode.channels) if has_probes else None
        if self.probes is not None:
            space = self.probes.space
        widths = [self.encode.channels] + [channels] * layers
        self.layers = nn.ModuleList(
            UNFLinear(space, a, b, basis=basis) for a, b in zip(widths[:-1], widths[1:])
        )
        self.act = UNFPointwise()
        self.pool = UNFPool(space, channels)
        extra = self.probes.out_features if self.probes is not None else 0
        self.head = nn.Sequential(
            nn.Linear(self.pool.out_features + extra, 128), nn.ReLU(), nn.Linear(128, out)
        )

    def forward(self, weights: dict[str, Tensor]) -> Tensor:
        names = self.probes.names if self.probes is not None else ()
        x = {k: self.encode(v) for k, v in weights.items() if k not in names}
        summary = None
        if self.probes is not None:
            encoded, summary = self.probes({k: weights[k] for k in names})
            x.update(encoded)
        for layer in self.layers:
            x = self.act(layer(x))
        pooled = self.pool(x)
        return self.head(pooled if summary is None else torch.cat([pooled, summary], -1))


class NFNClassifier(nn.Module):
    """The ``nfn`` package's invariant network, as its INR-classification examples build it:
    ``NPLinear``/``HNPLinear`` layers with ReLU, ``NPPool``/``HNPPool``, an MLP head.

    ``mode="np"`` treats the input and output neurons as permutable too (NFN-NP);
    ``"hnp"`` permutes hidden neurons only (NFN-HNP). Reads ``{name: (B, *shape)}``.
    """

    def __init__(
        self,
        space: WeightSpace,
        out: int,
        channels: int = 16,
        layers: int = 2,
        mode: str = "hnp",
        frequencies: int = 0,
    ):
        super().__init__()
        from nfn.common import ArraySpec, NetworkSpec
        from nfn.layers import HNPLinear, HNPPool, NPLinear, NPPool

        names = list(space.tensors)
        if len(names) % 2 or any(
            len(space.tensors[w].shape) < 2 or len(space.tensors[b].shape) != 1
            for w, b in zip(names[::2], names[1::2])
        ):
            raise ValueError(
                "nfn classifiers need an MLP or CNN space: (weight, bias) pairs in order"
            )
        self.weight_names, self.bias_names = names[::2], names[1::2]
        shapes = [space.tensors[w].shape for w in self.weight_names]
        # -1: a permuted axis (nfn's convention); inputs and outputs keep their sizes;
        # conv weights keep their filter axes (nfn's CNN support, e.g. the CNN zoo)
        last = len(shapes) - 1
        wspec = [
            ArraySpec(
                (shapes[i][0] if i == last else -1, shapes[i][1] if i == 0 else -1)
                + tuple(shapes[i][2:])
            )
            for i in range(len(shapes))
        ]
        bspec = [ArraySpec((shapes[i][0] if i == last else -1,)) for i in range(len(shapes))]
        spec = NetworkSpec(wspec, bspec)
        linear, pool = (HNPLinear, HNPPool) if mode == "hnp" else (NPLinear, NPPool)
        self.encode = _Encode(frequencies)
        widths = [self.encode.channels] + [channels] * layers
        self.layers = nn.ModuleList(linear(spec, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.pool = pool(spec)
        self.head = nn.Sequential(
            nn.Linear(channels * pool.get_num_outs(spec), 128), nn.ReLU(), nn.Linear(128, out)
        )

    def forward(self, weights: dict[str, Tensor]) -> Tensor:
        from nfn.common import WeightSpaceFeatures

        x = WeightSpaceFeatures(
            [self.encode(weights[n]) for n in self.weight_names],
            [self.encode(weights[n]) for n in self.bias_names],
        )
        for layer in self.layers:
            x = layer(x)
            x = WeightSpaceFeatures(
                [torch.relu(w) for w in x.weights], [torch.relu(b) for b in x.biases]
            )
        return self.head(self.pool(x).flatten(1))


def build_model(
    kind: str,
    space: WeightSpace,
    out: int,
    hidden: int = 16,
    example_graph=None,
    frequencies: int = 0,
) -> nn.Module:
    """One of :data:`KINDS` (or :data:`EXTERNAL_KINDS`) for ``space`` with ``out`` outputs.

    ``frequencies`` > 0 Fourier-encodes each weight value before the first equivariant
    layer (unf, nfn and the nfn package's models; GMN always encodes its inputs)."""
    from metanet.nn import GMN, FlatMLP, StatNN

    if kind == "unf":
        return UNFClassifier(space, out, hidden, frequencies=frequencies)
    if kind == "nfn":
        return UNFClassifier(space, out, hidden, basis="nfn", frequencies=frequencies)
    if kind in GRAPH_KINDS and example_graph is None:
        raise ValueError(f"{kind} needs an example graph for its feature sizes")
    if kind == "transformer":
        from metanet.nn import GraphTransformer

        return GraphTransformer(
            example_graph.x.shape[1],
            example_graph.edge_attr.shape[1],
            hidden=max(hidden, 32),
            layers=3,
            out_features=out,
        )
    if kind == "scalegmn":
        from metanet.nn import ScaleGMN

        return ScaleGMN(
            example_graph.x.shape[1],
            example_graph.edge_attr.shape[1],
            hidden=max(hidden, 32),
            layers=3,
            out_features=out,
            head=128,
        )
    if kind == "gmn":
        # summary + head: the same DeepSets summary of node inputs (64) and head width
        # (128) as the UNF classifier's probe encoder and head
        return GMN(
            example_graph.x.shape[1],
            example_graph.edge_attr.shape[1],
            hidden=hidden,
            layers=3,
            out_features=out,
            summary=64,
            head=128,
        )
    if kind in EXTERNAL_KINDS:
        mode = kind.removeprefix("nfn-")
        return NFNClassifier(space, out, hidden, mode=mode, frequencies=frequencies)
    if kind == "statnn":
        return StatNN(space, out)
    if kind == "flat":
        return FlatMLP(space, out)
    raise ValueError(f"kind must be one of {KINDS + EXTERNAL_KINDS}, got {kind!r}")


@dataclass
class TrainResult:
    kind: str
    epochs: int
    test_accuracy: float
    val_accuracy: float
    seconds: float
    world_size: int
    history: list[dict] = field(default_factory=list)
    # target="accuracy" (generalization prediction): Kendall τ and MSE of the predicted
    # accuracies; test_accuracy / val_accuracy are NaN then
    test_kendall_tau: float = float("nan")
    val_kendall_tau: float = float("nan")
    test_mse: float = float("nan")


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _distributed() -> tuple[int, int, bool]:
    """``(rank, world size, whether this call made the process group)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        made = not dist.is_initialized()
        if made:
            dist.init_process_group("gloo")
            # if training fails, still torn down before the interpreter exits: left to
            # static destructors, gloo's threads can abort the process ("terminate called
            # without an active exception", exit code -6)
            atexit.register(_destroy_group)
        return dist.get_rank(), dist.get_world_size(), made
    return 0, 1, False


def _leave_together(made: bool) -> None:
    """The ranks leave ``train`` together, and the group it made is torn down by all at
    once (as PyTorch asks). Rank 0 evaluates the test split alone after training; before
    this, the other ranks went on to exit and tore their half of the group down meanwhile,
    the likely cause of a rare abort at exit (exit code -6, "terminate called without an
    active exception")."""
    import torch.distributed as dist

    dist.barrier()
    if made:
        dist.destroy_process_group()


def _batches(ds, kind: str, indices: list[int], cache: dict | None = None):
    from torch_geometric.data import Batch

    if kind in GRAPH_KINDS:
        if cache is None:
            items = [ds[i] for i in indices]
        else:  # no augmentation: each graph is built once
            items = [cache[i] if i in cache else cache.setdefault(i, ds[i]) for i in indices]
        return Batch.from_data_list(items), torch.cat([g.y for g in items])
    if not ds.augment:  # one gather per tensor, no per-item work
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ds.gather(indices), ds.labels[idx]
    items = [ds[i] for i in indices]
    w = {n: torch.stack([it[0][n] for it in items]) for n in items[0][0]}
    return w, torch.stack([it[1] for it in items])


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (too high a learning rate, most often)."""


def _to(x, device: torch.device | None):
    """A batch (a dict of tensors, a tensor, a PyG batch) on ``device``: on a GPU from
    pinned memory, without waiting for the copy."""
    if device is None or device.type == "cpu":
        return x
    fast = device.type == "cuda"
    if isinstance(x, dict):
        return {
            k: (v.pin_memory() if fast else v).to(device, non_blocking=fast) for k, v in x.items()
        }
    if isinstance(x, Tensor):
        return (x.pin_memory() if fast else x).to(device, non_blocking=fast)
    return x.to(device, non_blocking=fast)


def _step(net, opt, sched, x, y, regress: bool) -> Tensor:
    """One optimizer step on a batch already on the model's device; the loss, detached
    (nothing read back to the host)."""
    if regress:
        loss = nn.functional.mse_loss(net(x).reshape(-1), y)
    else:
        loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.detach()


def _eval_batch(kind: str, batch: int) -> int:
    # GMN's per-edge states of 512 graphs (~37 MB a tensor) spill the CPU caches: it
    # evaluates ~3x faster per graph in batches of 64 (the graphs do not interact)
    return min(batch, 64) if kind in GRAPH_KINDS else batch


@torch.no_grad()
def _accuracy(
    model, ds, kind: str, batch: int = 512, cache: dict | None = None, device=None
) -> float:
    model.eval()
    batch = _eval_batch(kind, batch)
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device
    for start in range(0, len(ds), batch):
        x, y = _batches(ds, kind, list(range(start, min(len(ds), start + batch))), cache)
        correct += (model(_to(x, device)).argmax(-1) == _to(y, device)).sum()
    model.train()
    return int(correct) / max(1, len(ds))


@torch.no_grad()
def _regression(model, ds, kind: str, batch: int = 512, cache: dict | None = None, device=None):
    """``(kendall_tau, mse)`` of the model's predictions against ``ds.labels``."""
    model.eval()
    batch = _eval_batch(kind, batch)
    preds = []
    for start in range(0, len(ds), batch):
        x, _ = _batches(ds, kind, list(range(start, min(len(ds), start + batch))), cache)
        preds.append(model(_to(x, device)).reshape(-1))
    model.train()
    p = torch.cat(preds).double().cpu()
    y = ds.labels.double()
    return kendall_tau(p, y), float((p - y).pow(2).mean())


def _use_target(ds, target: str) -> None:
    """Point ``ds.labels`` at ``target``: each row's ``label`` (a class) or ``accuracy``
    (a zoo CNN's test accuracy). A dataset whose rows lack it is refused, naming it."""
    key = "accuracy" if target == "accuracy" else "label"
    row = next((r for r in ds.rows if key not in r), None)
    if row is not None:
        has = [k for k in ("label", "accuracy") if k in row]
        raise CheckpointError(
            f"{ds.root}: its networks have no {key!r}, the target={target!r} (--target "
            f"{target}) to learn; they have {', '.join(map(repr, has)) or 'no target'}"
            + (" (CNN zoos from metanet zoo make have one)" if key == "accuracy" else "")
        )
    if target == "accuracy":
        ds.labels = torch.tensor([float(r["accuracy"]) for r in ds.rows], dtype=torch.float32)


def _check_trainable(root, n_train: int, batch_size: int) -> None:
    """Refuse a run in which no optimizer step would happen (it would report an untrained
    model's scores as results)."""
    if n_train < 2:
        raise CheckpointError(f"{root}: {n_train} training network(s); training needs at least two")
    if n_train < batch_size:
        raise CheckpointError(
            f"{root}: {n_train} training networks, fewer than batch_size={batch_size} "
            "(--batch-size): no training step would run; lower it or use more networks"
        )


def _json_safe(value):
    """``value`` with every non-finite float as ``None``: JSON has no NaN (``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _epoch_line(row: dict, epochs: int) -> str:
    """One console line per epoch: ``epoch 3/10  train loss 1.2345  val accuracy 0.4567 ...``."""
    cells = [f"epoch {row['epoch']}/{epochs}"]
    for key, value in row.items():
        if key not in ("epoch", "seconds") and isinstance(value, float):
            cells.append(f"{key.replace('_', ' ')} {value:.4f}")
    return "  ".join([*cells, f"({row['seconds']:.1f} s)"])


def train(
    kind: str,
    root: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    hidden: int = 16,
    seed: int = 0,
    augment: bool = True,
    limit: int | None = None,
    progress: bool = True,
    frequencies: int = 0,
    track_test: bool = False,
    schedule: str = "constant",
    target: str = "label",
    canonicalize: bool = False,
    flip_signs: bool = False,
    probes: int = 0,
    patience: int | None = None,
    coords: CoordAugment | bool | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train ``kind`` on the INR dataset at ``root`` (train split), report val/test accuracy.

    ``limit`` caps the number of training INRs (quick runs): a fixed random subset of the
    training split, the same for every model and seed. ``frequencies`` Fourier-encodes the
    weights for the equivariant models (see :func:`build_model`); ``track_test`` also
    records test accuracy after every epoch (for curves); ``schedule="cosine"`` anneals
    the learning rate to 0 over the run. ``target="accuracy"`` regresses each network's
    recorded test accuracy (a CNN zoo from :func:`tasks.datasets.zoo.make_zoo`: generalization
    prediction) with an MSE loss and reports Kendall τ instead of accuracy.
    ``canonicalize=True`` feeds every model the sign canonical form of the weights
    (:func:`metanet.canonicalize_sign`; a no-op for spaces without sign groups), so a
    permutation-equivariant model no longer has to learn the sign symmetry of odd
    activations from data. ``flip_signs=True`` (with ``augment``) instead trains on random
    sign flips as well as permutations, for every model (the alternative to
    ``canonicalize``: learn the sign symmetry from data). ``probes=P`` gives every model
    the networks' probe features too (:mod:`metanet.probe`: each neuron's activations at
    ``P`` fixed inputs, extra tensors of the space, so every model reads them unchanged).
    ``patience=k`` stops once validation has not improved for ``k`` epochs and reports the
    test metric of the epoch with the best validation metric (early stopping on val; the
    model saved is that one). ``coords`` (an INR dataset; a :class:`tasks.datasets.inr.CoordAugment`,
    or ``True`` for its defaults) augments every training INR with a fresh random affine
    map of its input coordinates, applied to its first layer (the image it draws rotated,
    scaled, sheared, shifted; the label is kept), for every model. Run under ``torchrun
    --nproc_per_node N`` for data parallelism. ``device``: where the model trains (the
    batches are built on the CPU and copied there; the loss is summed on the device, so a
    step does not wait for the host).
    """
    from tasks.datasets.inr import CoordAugment, WeightDataset

    if coords is True:
        coords = CoordAugment()
    elif coords is False:
        coords = None
    elif coords is not None and not isinstance(coords, CoordAugment):
        raise TypeError(f"coords must be a CoordAugment, True or None, got {coords!r}")

    if target not in ("label", "accuracy"):
        raise ValueError(f"target must be 'label' or 'accuracy', got {target!r}")
    regress = target == "accuracy"
    rank, world, made_group = _distributed()
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
    fmt = "graph" if kind in GRAPH_KINDS else "weights"
    # Augmenting by random permutations only matters to a model that is not invariant by
    # construction (flat): the others give the same output on every permutation, so it is
    # skipped for them (and their batches are gathered, GMN's graphs built once). Random
    # sign flips (``flip_signs``) change every model's output, so they are always drawn.
    flips = flip_signs and not canonicalize and kind not in SCALE_KINDS
    augment = augment and (kind not in PERMUTATION_INVARIANT_KINDS or flips)
    flip_signs = flips
    scaling = "scale" if kind in SCALE_KINDS else True
    # every rank draws its own augmentations; the batches themselves are shared
    train_ds = WeightDataset(
        root,
        "train",
        fmt,
        augment=augment,
        seed=seed * 1000 + rank,
        standardize=scaling,
        canonicalize=canonicalize,
        flip_signs=flip_signs,
        probes=probes,
        coords=coords,
    )
    fresh = augment or coords is not None  # every epoch draws new training samples
    caches: dict[str, dict | None] = {
        s: ({} if kind in GRAPH_KINDS and not (s == "train" and fresh) else None)
        for s in ("train", "val", "test")
    }
    val_ds, test_ds = (
        WeightDataset(root, s, fmt, standardize=scaling, canonicalize=canonicalize, probes=probes)
        for s in ("val", "test")
    )
    for ds in (train_ds, val_ds, test_ds):
        _use_target(ds, target)
    for name, ds in (("validation", val_ds), ("test", test_ds)):
        if len(ds) == 0:  # a score of nothing would be reported as 0 (or fail)
            raise CheckpointError(
                f"{root}: its {name} split is empty ({len(train_ds)} training networks); "
                "make a dataset of more images or networks"
            )
    classes = 10
    if not regress:
        labels = torch.cat([ds.labels for ds in (train_ds, val_ds, test_ds)])
        if int(labels.min()) < 0:
            raise CheckpointError(
                f"{root}: {int((labels < 0).sum())} networks have label {int(labels.min())} "
                "(-1: fitted to an .npy of images without labels); a classifier needs classes"
            )
        classes = max(classes, int(labels.max()) + 1)  # 10 outputs, or one per class
    pool = list(range(len(train_ds)))
    if limit and limit < len(train_ds):
        subset = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))
        pool = sorted(subset[:limit].tolist())
    n_train = len(pool)
    _check_trainable(root, n_train, batch_size)
    torch.manual_seed(seed)
    model = build_model(
        kind,
        train_ds.space,
        1 if regress else classes,
        hidden,
        example_graph=train_ds[0] if kind in GRAPH_KINDS else None,
        frequencies=frequencies,
    )
    device = torch.device(device) if device is not None else None
    if device is not None:
        model.to(device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_total = epochs * (n_train // batch_size)
    sched = None
    if schedule == "cosine":
        sched = cosine_schedule(opt, steps_total)
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    per_rank = batch_size // world
    history: list[dict] = []
    best = BestEpoch(patience)  # early stopping (rank 0 tracks it)
    start = time.perf_counter()
    epochs_iter = range(epochs)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=f"train {kind}", unit="epoch")
    for epoch in epochs_iter:
        order = torch.randperm(n_train, generator=gen).tolist()  # same on every rank
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for b in range(0, n_train - batch_size + 1, batch_size):
            mine = [pool[k] for k in order[b + rank * per_rank : b + (rank + 1) * per_rank]]
            x, y = _batches(train_ds, kind, mine, caches["train"])
            loss = _step(net, opt, sched, _to(x, device), _to(y, device), regress)
            total += loss.double() * len(mine)
            count += len(mine)
        total = float(total)  # once an epoch
        if world > 1:  # the loss of the global batches, not of this rank's half
            import torch.distributed as dist

            sums = torch.tensor([total, float(count)], dtype=torch.float64)
            dist.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        if not math.isfinite(total):
            where = f"; the epochs before are logged in {out}" if out is not None and epoch else ""
            raise TrainingDiverged(
                f"training {kind} diverged in epoch {epoch + 1}: the loss is {total} (lr {lr:g}; "
                f"try a lower --lr){where}"
            )
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(1, count),
            "seconds": time.perf_counter() - start,
        }
        if rank == 0 and regress:
            row["val_kendall_tau"], row["val_mse"] = _regression(
                model, val_ds, kind, cache=caches["val"], device=device
            )
            if track_test:
                row["test_kendall_tau"], row["test_mse"] = _regression(
                    model, test_ds, kind, cache=caches["test"], device=device
                )
        elif rank == 0:
            row["val_accuracy"] = _accuracy(model, val_ds, kind, cache=caches["val"], device=device)
            if track_test:
                row["test_accuracy"] = _accuracy(
                    model, test_ds, kind, cache=caches["test"], device=device
                )
        history.append(row)
        if progress and rank == 0:
            epochs_iter.write(_epoch_line(row, epochs))
        if out is not None and rank == 0:
            _log(Path(out), history)
        if patience is not None and _early_stop(row, history, best, model, regress, world):
            break
    final = history[-1]
    if patience is not None and rank == 0 and best.state is not None:
        best.restore(model)  # the epoch with the best validation metric
        final = history[best.epoch - 1]
    test_acc = float("nan")
    extra: dict[str, float] = {}
    if rank == 0 and regress:
        tau, mse = _regression(model, test_ds, kind, cache=caches["test"], device=device)
        extra = {
            "test_kendall_tau": tau,
            "val_kendall_tau": final.get("val_kendall_tau", float("nan")),
            "test_mse": mse,
        }
    elif rank == 0:
        test_acc = (
            final["test_accuracy"]
            if track_test
            else _accuracy(model, test_ds, kind, cache=caches["test"], device=device)
        )
    result = TrainResult(
        kind,
        len(history),
        test_acc,
        final.get("val_accuracy", float("nan")),
        time.perf_counter() - start,
        world,
        history,
        **extra,
    )
    if out is not None and rank == 0:
        _finish(Path(out), model, result)
    if world > 1:
        _leave_together(made_group)
    return result


def _early_stop(row: dict, history: list[dict], best, model: nn.Module, regress: bool, world: int):
    """Track the best validation epoch (``best``: a :class:`~tasks.learn.metrics.BestEpoch`);
    True once its patience has passed without improvement. Rank 0 decides, the others
    follow."""
    metric = row.get("val_kendall_tau" if regress else "val_accuracy")
    stop = False
    if metric is not None:  # rank 0 (only it evaluates)
        stop = best.update(metric, len(history), model)
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(stop)])
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


def _log(out: Path, history: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in history)
    atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))


def _finish(out: Path, model: nn.Module, result: TrainResult) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp))
    text = json.dumps(_json_safe(asdict(result)), indent=2, allow_nan=False)
    atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(text))
    import matplotlib.pyplot as plt

    fig = _plot_curves(result)
    atomic_write(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _plot_curves(result: TrainResult):
    """The training curves of ``result`` (a matplotlib Figure): train loss on the left
    axis, the validation metric on the right, both labelled; the legend sits below the
    axes, clear of the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    ep = [r["epoch"] for r in result.history]
    ax.plot(ep, [r["train_loss"] for r in result.history], label="train loss")
    ax2 = ax.twinx()
    tau = math.isfinite(result.test_kendall_tau)
    key, name = ("val_kendall_tau", "Kendall τ") if tau else ("val_accuracy", "accuracy")
    ax2.plot(
        ep,
        [r.get(key, float("nan")) for r in result.history],
        color="C1",
        label=f"val {name}",
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (MSE)" if tau else "train loss (cross-entropy)")
    ax2.set_ylabel(f"validation {name}")
    final = result.test_kendall_tau if tau else result.test_accuracy
    ax.set_title(f"{result.kind}: test {name} {final:.3f}", fontsize=9)
    fig.legend(fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # the bottom strip holds the legend
    return fig
