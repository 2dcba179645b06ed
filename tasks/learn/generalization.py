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
  images of digits), :func:`metanet.probe.probe_features` of the zoo's CNN: each hidden
  channel's mean activation on every probe, read by a per-layer DeepSets (an MLP per
  channel, mean and max over channels: invariant to permuting the channels by
  construction), and the log-probabilities of the classes on the probes (fixed output
  neurons, read as they are): :class:`metanet.probe.ProbeEncoder`'s summary.

Every predictor is invariant to the space's permutations, so none is trained with
permutation augmentation. Probe features are computed once per network (the CNN's own
activation and architecture come from the zoo's ``dataset.json`` and index rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from metanet.probe import PROBE_PREFIX, ProbeEncoder, probe_space
from metanet.space import WeightSpace
from tasks.learn.metrics import fit_regression, kendall_tau

__all__ = [
    "weight_statistics",
    "InvariantConcat",
    "cnn_probe_features",
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
    per-tensor statistics (``stats``) and the summary of a
    :class:`~metanet.probe.ProbeEncoder` (``probe``) add blocks.
    Each block is layer-normalized so none dominates by scale. Input: a dict with
    ``"weights"`` (and ``"graph"`` for GMN, ``"probe"`` for probes) -> ``(B, out)``."""

    def __init__(
        self,
        space: WeightSpace,
        body: nn.Module | None,
        body_width: int,
        stats: bool,
        probe: ProbeEncoder | None,
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
            parts.append(self.norms[2](self.probe(x["probe"])[1]))
        return self.head(torch.cat(parts, dim=1))


def build_predictor(
    name: str,
    space: WeightSpace,
    hidden: int = 16,
    example_graph=None,
    probes: WeightSpace | None = None,
) -> nn.Module:
    """The predictor ``base[+stats][+probe]`` (see the module docstring) for ``space``.

    ``probes`` is the :func:`metanet.probe.probe_space` of ``space`` and the probe
    features (:func:`zoo_probe_features`), for ``+probe``."""
    base, *extras = name.split("+")
    if set(extras) - {"stats", "probe"} or len(set(extras)) != len(extras):
        raise ValueError(f"predictor {name!r}: suffixes are +stats and +probe")
    if not extras:
        from tasks.learn.train import build_model

        return build_model(base, space, 1, hidden, example_graph=example_graph)
    body, width = (None, 0) if base == "none" else _body(base, space, hidden, example_graph)
    probe = None
    if "probe" in extras:
        if probes is None:
            raise ValueError(f"{name!r} needs probes= (the probe_space of its features)")
        probe = ProbeEncoder(probes, None, hidden=32, fixed="flatten")
    return InvariantConcat(space, body, width, "stats" in extras, probe)


def probe_inputs(probes: int, seed: int = 0) -> Tensor:
    """``probes`` digits *training* images ``(probes, 1, 8, 8)``, the same for every zoo."""
    from tasks.datasets import digits

    data = digits.load(0.25, seed=0)
    pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    return data.x_train[pick[:probes]]


def cnn_probe_features(
    family, weights: dict[str, Tensor], activations: list[str], inputs: Tensor
) -> dict[str, Tensor]:
    """Probe features of a batch of zoo CNNs of ``family`` (``weights``: one leading axis,
    model ``i`` with activation ``activations[i]``) on ``inputs`` ``(P, 1, 8, 8)``.

    :func:`metanet.probe.probe_features` of the family's module, run once per activation:
    ``{"probe:<set>": (B, |set|, P)}``, each hidden channel's mean activation over
    positions and, for the output set, the log-probabilities of the classes (the logits
    shifted by their log-sum-exp: what the network predicts, whatever their offset)."""
    from metanet.probe import probe_features
    from tasks.datasets.zoo import zoo_space

    space = zoo_space(family)
    out: dict[str, Tensor] = {}
    n = len(activations)
    for act in sorted(set(activations)):
        idx = torch.tensor([i for i, a in enumerate(activations) if a == act])
        model = family.module(act).to(inputs.dtype).eval()
        feats = probe_features(model, space, {k: t[idx] for k, t in weights.items()}, inputs)
        for k, f in feats.items():
            if k not in out:
                out[k] = f.new_zeros(n, *f.shape[1:])
            out[k][idx] = f
    key = PROBE_PREFIX + space.tensors[f"{family.layers[-1]}.weight"].out_set
    out[key] = torch.log_softmax(out[key], dim=1)  # over the classes
    return out


def zoo_probe_features(root: str | os.PathLike, probes: int = 16) -> dict[str, Tensor]:
    """:func:`cnn_probe_features` of every network of the zoo at ``root`` (all splits, in
    its order; each with its own activation) on :func:`probe_inputs`, from the raw
    (unstandardized) weights."""
    import json

    from tasks.datasets.inr import WeightDataset
    from tasks.datasets.zoo import BASE, Family

    meta = json.loads((Path(root) / "dataset.json").read_text())
    fam = meta.get("family")
    family = (
        BASE
        if fam is None
        else Family(**{k: tuple(v) if isinstance(v, list) else v for k, v in fam.items()})
    )
    raw = WeightDataset(root)
    acts = [r.get("activation", family.activations[0]) for r in raw.rows]
    return cnn_probe_features(family, raw.tensors, acts, probe_inputs(probes))


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
    model = build_predictor(
        name,
        train.space,
        hidden,
        example_graph=train.graphs[0] if graphs else None,
        probes=probe_space(train.space, {k: v[0] for k, v in probe.items()}) if probe else None,
    )
    device = torch.device(device) if device is not None else None
    if device is not None:
        model.to(device)
    eval_batch = 64 if graphs else 512

    def predict(idx: Tensor) -> Tensor:
        return _call(model, _on(train.batch(idx), device)).reshape(-1)

    def validate() -> dict[str, float]:
        tau, mse = _evaluate(model, val, eval_batch, device)
        return {"val_kendall_tau": tau, "val_mse": mse}

    best, history, seconds = fit_regression(
        model, len(train), predict, train.y, validate, epochs=epochs, patience=patience,
        batch_size=batch_size, lr=lr, seed=seed, device=device,
    )  # fmt: skip
    test_tau, test_mse = _evaluate(model, test, eval_batch, device)
    return FitResult(
        name,
        test_tau,
        best.value,
        test_mse,
        best.epoch,
        len(history),
        seconds,
        history,
    )
