"""Generalization prediction: regress a network's test accuracy from its weights.

:func:`fit` trains one predictor on a zoo folder (:func:`tasks.datasets.zoo.make_zoo`, or one
family of :func:`tasks.datasets.zoo.make_varied_zoo`) with the literature's protocol: MSE on the
recorded test accuracy, Adam with a cosine schedule, early stopping on the validation
split's Kendall τ; it reports Kendall τ on the test split at the best validation epoch.

A predictor is named ``base[+stats][+probe]``:

* ``base``: any :func:`tasks.learn.train.build_model` kind (``statnn``, ``flat``, ``unf``,
  ``nfn``, ``gmn``, ``scalegmn``, ``nfn-np``, ``nfn-hnp``), or ``none`` (only what the
  suffixes add);
* ``+stats``: the base's invariant features (its pooled output, before its head) are
  concatenated with per-tensor weight statistics — StatNN's mean, variance and quantiles —
  and one MLP head reads both (:class:`InvariantConcat`);
* ``+probe``: features of the network *run* on fixed probe inputs (``probes`` training
  images of digits): each hidden channel's mean activation on every probe, read by a
  per-layer DeepSets (an MLP per channel, mean over channels: invariant to permuting the
  channels by construction), and the logits on the probes (fixed output neurons)
  (:class:`ProbeDeepSets`).

Every predictor is invariant to the space's permutations, so none is trained with
permutation augmentation. Probe features are computed once per network (the CNN's own
activation and architecture come from the zoo's ``dataset.json`` and index rows).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.space import WeightSpace
from tasks.learn.metrics import BestEpoch, cosine_schedule

__all__ = [
    "weight_statistics",
    "InvariantConcat",
    "ProbeDeepSets",
    "zoo_probe_features",
    "build_predictor",
    "fit",
    "FitResult",
]

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def weight_statistics(weights: dict[str, Tensor], names: list[str]) -> Tensor:
    """StatNN's features: per tensor, mean, variance and the 0/25/50/75/100% quantiles of
    its values: ``{name: (B, *shape)} -> (B, 7 * len(names))``. Invariant to every
    permutation of the values within a tensor."""
    b = weights[names[0]].shape[0]
    out = []
    for n in names:
        w = weights[n].reshape(b, -1)
        q = torch.quantile(w, w.new_tensor(QUANTILES), dim=1).T  # on w's device
        out += [w.mean(1, keepdim=True), w.var(1, keepdim=True, unbiased=False), q]
    return torch.cat(out, dim=1)


def _mlp(i: int, hidden: int, o: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(i, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, o)
    )


class ProbeDeepSets(nn.Module):
    r"""Invariant features of a network's behaviour on fixed probe inputs.

    For hidden layer :math:`\ell` with channel activations :math:`a_{\ell c} \in
    \mathbb{R}^P` (mean over positions, one value per probe):

    .. math::

        z = \Big[\ \operatorname{mean}_c\, \phi_\ell(a_{\ell c}),\ \
              \operatorname{max}_c\, \phi_\ell(a_{\ell c})\ \Big]_\ell \ \oplus\
              \operatorname{log\,softmax}(\text{logits})

    Permuting the channels of a layer permutes the :math:`a_{\ell c}` and leaves
    :math:`z` unchanged. Input ``{"hidden{ℓ}": (B, C_ℓ, P), "logits": (B, P, classes)}``
    -> ``(B, out_features)``.
    """

    def __init__(self, layers: int, probes: int, classes: int, hidden: int = 32):
        super().__init__()
        self.phi = nn.ModuleList(
            nn.Sequential(nn.Linear(probes, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            for _ in range(layers)
        )
        self.out_features = 2 * hidden * layers + probes * classes

    def forward(self, probe: dict[str, Tensor]) -> Tensor:
        parts = []
        for k, phi in enumerate(self.phi):
            h = phi(probe[f"hidden{k}"])  # (B, C, hidden)
            parts += [h.mean(1), h.amax(1)]
        parts.append(torch.log_softmax(probe["logits"], -1).flatten(1))
        return torch.cat(parts, dim=1)


def _body(kind: str, space: WeightSpace, hidden: int, example_graph) -> tuple[nn.Module, int]:
    """A base model without its head: ``(module, width of its invariant features)``."""
    from metanet.nn import GMN, ScaleGMN
    from tasks.learn.train import build_model

    if kind in ("gmn", "scalegmn"):
        width = 4 * hidden
        g = example_graph
        net = GMN if kind == "gmn" else ScaleGMN
        return net(g.x.shape[1], g.edge_attr.shape[1], hidden=hidden, out_features=width), width
    model = build_model(kind, space, 1, hidden)
    if not hasattr(model, "head"):
        raise ValueError(f"{kind!r} has no invariant features to share (use it alone)")
    width = model.head[0].in_features
    model.head = nn.Identity()
    return model, width


class InvariantConcat(nn.Module):
    """One MLP head on the concatenation of invariant feature blocks.

    ``body`` (a base model without its head) reads the weights (or their graph); the
    per-tensor statistics (``stats``) and a :class:`ProbeDeepSets` (``probe``) add blocks.
    Each block is layer-normalized so none dominates by scale. Input: a dict with
    ``"weights"`` (and ``"graph"`` for GMN, ``"probe"`` for probes) -> ``(B, out)``."""

    def __init__(
        self,
        space: WeightSpace,
        body: nn.Module | None,
        body_width: int,
        stats: bool,
        probe: ProbeDeepSets | None,
        out: int = 1,
        hidden: int = 128,
    ):
        super().__init__()
        self.names = list(space.tensors)
        self.body, self.stats, self.probe = body, stats, probe
        widths = [body_width if body is not None else 0]
        widths.append(len(self.names) * (2 + len(QUANTILES)) if stats else 0)
        widths.append(probe.out_features if probe is not None else 0)
        self.norms = nn.ModuleList(nn.LayerNorm(w) if w else nn.Identity() for w in widths)
        self.head = _mlp(sum(widths), hidden, out)

    def forward(self, x: dict) -> Tensor:
        parts = []
        if self.body is not None:
            parts.append(self.norms[0](self.body(x.get("graph", x["weights"]))))
        if self.stats:
            parts.append(self.norms[1](weight_statistics(x["weights"], self.names)))
        if self.probe is not None:
            parts.append(self.norms[2](self.probe(x["probe"])))
        return self.head(torch.cat(parts, dim=1))


def build_predictor(
    name: str,
    space: WeightSpace,
    hidden: int = 16,
    example_graph=None,
    probe_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """The predictor ``base[+stats][+probe]`` (see the module docstring) for ``space``.

    ``probe_shape`` is ``(hidden layers, probes, classes)`` for ``+probe``."""
    base, *extras = name.split("+")
    if set(extras) - {"stats", "probe"} or len(set(extras)) != len(extras):
        raise ValueError(f"predictor {name!r}: suffixes are +stats and +probe")
    if not extras:
        from tasks.learn.train import build_model

        return build_model(base, space, 1, hidden, example_graph=example_graph)
    body, width = (None, 0) if base == "none" else _body(base, space, hidden, example_graph)
    probe = None
    if "probe" in extras:
        if probe_shape is None:
            raise ValueError(f"{name!r} needs probe_shape (hidden layers, probes, classes)")
        probe = ProbeDeepSets(*probe_shape)
    return InvariantConcat(space, body, width, "stats" in extras, probe)


def probe_inputs(probes: int, seed: int = 0) -> Tensor:
    """``probes`` digits *training* images ``(probes, 1, 8, 8)``, the same for every zoo."""
    from tasks.datasets import digits

    data = digits.load(0.25, seed=0)
    pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    return data.x_train[pick[:probes]]


def zoo_probe_features(root: str | os.PathLike, probes: int = 16) -> dict[str, Tensor]:
    """Probe features of every network of the zoo at ``root`` (all splits, in its order).

    (Not :func:`metanet.probe.probe_features`, the per-neuron features of any space that
    graph and UNF models read as extra tensors: these are per-channel spatial means of a
    zoo CNN run with each model's own activation, read by :class:`ProbeDeepSets`.)

    Returns ``{"hidden{ℓ}": (n, width, probes), "logits": (n, probes, 10)}`` from
    :func:`tasks.datasets.zoo.channel_activations` on the raw (unstandardized) weights."""
    import json

    from tasks.datasets.inr import WeightDataset
    from tasks.datasets.zoo import BASE, Family, channel_activations

    meta = json.loads((Path(root) / "dataset.json").read_text())
    fam = meta.get("family")
    family = (
        BASE
        if fam is None
        else Family(**{k: tuple(v) if isinstance(v, list) else v for k, v in fam.items()})
    )
    raw = WeightDataset(root)
    x = probe_inputs(probes)
    out: dict[str, list[Tensor]] = {}
    for start in range(0, len(raw), 256):
        idx = torch.arange(start, min(len(raw), start + 256))
        w = {n: t[idx] for n, t in raw.tensors.items()}
        acts = tuple(raw.rows[i].get("activation", family.activations[0]) for i in idx.tolist())
        hidden, logits = channel_activations(w, x, family, acts)
        for k, h in enumerate(hidden):
            out.setdefault(f"hidden{k}", []).append(h)
        out.setdefault("logits", []).append(logits)
    return {k: torch.cat(v) for k, v in out.items()}


@dataclass
class FitResult:
    name: str
    test_kendall_tau: float
    val_kendall_tau: float
    test_mse: float
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)


class _Split:
    """One split of a zoo: standardized weights, targets, probe features, graphs."""

    def __init__(
        self,
        root,
        split: str,
        probe: dict[str, Tensor] | None,
        graphs: bool,
        standardize: bool | str = True,
    ):
        from tasks.datasets.inr import WeightDataset

        ds = WeightDataset(root, split, standardize=standardize)
        self.space = ds.space
        self.weights = ds.tensors
        self.y = torch.tensor([float(r["accuracy"]) for r in ds.rows])
        self.probe = None
        if probe is not None:
            pos = torch.tensor([r["model"] for r in ds.rows])  # model i is the zoo's row i
            self.probe = {k: v[pos] for k, v in probe.items()}
        self.graphs = None
        if graphs:
            from metanet.graph import to_graph

            self.graphs = [to_graph(ds.space, ds.weights(i)) for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: Tensor) -> dict:
        x: dict = {"weights": {n: t[idx] for n, t in self.weights.items()}}
        if self.probe is not None:
            x["probe"] = {k: v[idx] for k, v in self.probe.items()}
        if self.graphs is not None:
            from torch_geometric.data import Batch

            x["graph"] = Batch.from_data_list([self.graphs[i] for i in idx.tolist()])
        return x


def _on(x: dict, device) -> dict:
    """A batch (weights, probe features, graph) on ``device`` (``None``: where it is)."""
    if device is None:
        return x
    from tasks.learn.train import _to

    return {k: _to(v, device) for k, v in x.items()}


def _call(model: nn.Module, x: dict) -> Tensor:
    if isinstance(model, InvariantConcat):
        return model(x)
    return model(x.get("graph", x["weights"]))


@torch.no_grad()
def _evaluate(model: nn.Module, split: _Split, batch: int, device=None) -> tuple[float, float]:
    from tasks.learn.metrics import kendall_tau

    model.eval()
    preds = [
        _call(model, _on(split.batch(torch.arange(s, min(len(split), s + batch))), device))
        .reshape(-1)
        .cpu()
        for s in range(0, len(split), batch)
    ]
    model.train()
    p, y = torch.cat(preds).double(), split.y.double()
    return kendall_tau(p, y), float((p - y).pow(2).mean())


def fit(
    name: str,
    root: str | os.PathLike,
    *,
    epochs: int = 50,
    patience: int | None = 15,
    batch_size: int = 32,
    lr: float = 1e-3,
    hidden: int = 16,
    seed: int = 0,
    probes: int = 16,
    probe: dict[str, Tensor] | None = None,
    device: str | torch.device | None = None,
) -> FitResult:
    """Train predictor ``name`` on the zoo at ``root``; test Kendall τ at the best val epoch.

    Adam ``lr`` with a cosine schedule over ``epochs``; training stops early after
    ``patience`` epochs without a better validation τ. ``probe`` passes precomputed
    :func:`zoo_probe_features` (they are computed here otherwise, for ``+probe`` names).
    ``device``: where the predictor trains (batches are built on the CPU and copied
    there; the predictions come back for the metrics)."""
    base, *extras = name.split("+")
    graphs = base in ("gmn", "scalegmn")
    if "probe" in extras and probe is None:
        probe = zoo_probe_features(root, probes)
    elif "probe" not in extras:
        probe = None
    # ScaleGMN's sign/scale invariance holds for weights standardized by a scale only
    scaling = "scale" if base == "scalegmn" else True
    train, val, test = (_Split(root, s, probe, graphs, scaling) for s in ("train", "val", "test"))
    torch.manual_seed(seed)
    probe_shape = None
    if probe is not None:
        layers = sum(k.startswith("hidden") for k in probe)
        probe_shape = (layers, probe["logits"].shape[1], probe["logits"].shape[2])
    model = build_predictor(
        name,
        train.space,
        hidden,
        example_graph=train.graphs[0] if graphs else None,
        probe_shape=probe_shape,
    )
    device = torch.device(device) if device is not None else None
    if device is not None:
        model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(train) // batch_size)
    sched = cosine_schedule(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    eval_batch = 64 if graphs else 512
    best = BestEpoch(patience)
    history: list[dict] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        total = torch.zeros((), dtype=torch.float64, device=device)  # read once an epoch
        for b in range(0, len(train) - batch_size + 1, batch_size):
            idx = order[b : b + batch_size]
            x, y = _on(train.batch(idx), device), train.y[idx].to(device or "cpu")
            loss = nn.functional.mse_loss(_call(model, x).reshape(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().double() * len(idx)
        total = float(total)
        tau, mse = _evaluate(model, val, eval_batch, device)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / len(train),
                "val_kendall_tau": tau,
                "val_mse": mse,
            }
        )
        if best.update(tau, epoch + 1, model):
            break
    best.restore(model)
    test_tau, test_mse = _evaluate(model, test, eval_batch, device)
    return FitResult(
        name,
        test_tau,
        best.value,
        test_mse,
        best.epoch,
        len(history),
        time.perf_counter() - start,
        history,
    )
