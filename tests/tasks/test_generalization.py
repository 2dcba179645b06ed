"""Generalization predictors: invariance (float64), probe features, early stopping, reruns."""

from __future__ import annotations

import math

import pytest
import torch

from metanet.probe import probe_space
from tasks.datasets import digits
from tasks.datasets.inr import WeightDataset
from tasks.datasets.zoo import Family, make_varied_zoo, sample_hparams, zoo_space
from tasks.learn.generalization import (
    build_predictor,
    cnn_probe_features,
    fit,
    probe_inputs,
    zoo_probe_features,
)

FAMILY = Family("f", 3, 4, ("relu", "tanh", "gelu"), (5, 12))


def _inputs(weights: dict, acts: tuple[str, ...], graphs: bool) -> dict:
    from torch_geometric.data import Batch

    from metanet.graph import to_graph

    probes = cnn_probe_features(FAMILY, weights, list(acts), probe_inputs(5).double())
    x: dict = {"weights": weights, "probe": probes}
    if graphs:
        space = zoo_space(FAMILY)
        b = len(acts)
        x["graph"] = Batch.from_data_list(
            [to_graph(space, {n: t[i] for n, t in weights.items()}) for i in range(b)]
        )
    return x


@pytest.mark.parametrize(
    "name",
    [
        "unf+stats",
        pytest.param("nfn-hnp+stats", marks=pytest.mark.requires("nfn")),
        "gmn+stats",
        "none+stats+probe",
        "unf+stats+probe",
    ],
)
def test_predictors_are_invariant(name):
    """A random permutation of each CNN's hidden channels leaves every predictor's output
    unchanged (float64); its probe features are recomputed from the permuted weights."""
    space = zoo_space(FAMILY)
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(3, *t.shape, generator=gen, dtype=torch.float64)
               for n, t in space.tensors.items()}  # fmt: skip
    acts = ("relu", "tanh", "gelu")
    torch.manual_seed(0)
    graphs = name.startswith("gmn")
    x = _inputs(weights, acts, graphs)
    model = build_predictor(
        name,
        space,
        hidden=8,
        example_graph=x["graph"][0] if graphs else None,
        probes=probe_space(space, {k: v[0] for k, v in x["probe"].items()}),
    ).double()
    # nonzero output weights: a head that starts at zero would make any input pass
    ref = model(x)
    elements = [space.random_element(gen) for _ in range(3)]
    permuted = {n: torch.stack([space.apply({m: t[b] for m, t in weights.items()}, elements[b])[n]
                                for b in range(3)]) for n in weights}  # fmt: skip
    assert not torch.equal(permuted["0.weight"], weights["0.weight"])
    out = model(_inputs(permuted, acts, graphs))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert ref.std() > 0  # the outputs depend on the networks


def test_predictor_names_are_checked():
    space = zoo_space(FAMILY)
    with pytest.raises(ValueError, match="suffixes"):
        build_predictor("unf+stats+stats", space)
    with pytest.raises(ValueError, match="probes="):
        build_predictor("unf+probe", space)
    with pytest.raises(ValueError, match="no invariant features"):
        build_predictor("statnn+stats", space)


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_varied_zoo(root, 40, families=(FAMILY,), num_shards=1, progress=False)
    return root / FAMILY.name


def test_probe_features_follow_each_models_activation(small_zoo):
    """zoo_probe_features are the activations of each CNN (its own activation) on the probes."""
    ds = WeightDataset(small_zoo)
    pf = zoo_probe_features(small_zoo, probes=4)
    # one tensor per neuron set but the input: the three convs' channels, the 10 logits
    assert {k: v.shape for k, v in pf.items()} == {
        "probe:0": (len(ds), FAMILY.width, 4),
        "probe:2": (len(ds), FAMILY.width, 4),
        "probe:4": (len(ds), FAMILY.width, 4),
        "probe:8": (len(ds), 10, 4),
    }
    x = probe_inputs(4)
    acts = {ds.rows[i]["activation"] for i in range(len(ds))}
    assert len(acts) > 1  # the zoo mixes activations: each model runs with its own
    for i in range(0, len(ds), 5):
        model = FAMILY.module(ds.rows[i]["activation"]).eval()
        model.load_state_dict(ds.weights(i))
        with torch.no_grad():
            logp = torch.log_softmax(model(x), -1)
            torch.testing.assert_close(pf["probe:8"][i], logp.T, rtol=0, atol=1e-5)
            h = model[1](model[0](x))  # first conv + activation
            torch.testing.assert_close(pf["probe:0"][i], h.mean((-2, -1)).T, rtol=0, atol=1e-5)
            h = model[5](model[4](model[3](model[2](h))))  # the last conv's, pooled
            torch.testing.assert_close(pf["probe:4"][i], h.mean((-2, -1)).T, rtol=0, atol=1e-5)
    # the probes are training images, never the test images accuracy is measured on
    data = digits.load(0.25, seed=0)
    assert not (x[:, None] == data.x_test[None]).flatten(2).all(-1).any()
    assert sample_hparams(3, FAMILY).activation in FAMILY.activations


def test_fit_early_stops_at_best_val_and_reruns_bit_identically(small_zoo):
    a = fit("none+stats+probe", small_zoo, epochs=6, patience=2, batch_size=8, probes=4)
    b = fit("none+stats+probe", small_zoo, epochs=6, patience=2, batch_size=8, probes=4)
    assert a.test_kendall_tau == b.test_kendall_tau and a.history == b.history
    vals = [h["val_kendall_tau"] for h in a.history]
    finite = [v for v in vals if not math.isnan(v)]
    assert a.val_kendall_tau == (max(finite) if finite else vals[0])
    assert vals[a.best_epoch - 1] == a.val_kendall_tau
    assert a.epochs <= 6 and (a.epochs == 6 or a.epochs - a.best_epoch >= 2)
    assert -1 <= a.test_kendall_tau <= 1


def test_best_epoch_tracks_and_stops():
    """One early-stopping rule for train, generalization.fit and fit_mixed: the first
    epoch counts, NaN never beats it, patience counts epochs since the best."""
    import math

    from tasks.learn.metrics import BestEpoch

    net = torch.nn.Linear(2, 1)
    best = BestEpoch(patience=2)
    assert not best.update(math.nan, 1, net) and best.epoch == 1
    assert not best.update(0.5, 2, net) and best.epoch == 2
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not best.update(math.nan, 3, net) and best.epoch == 2
    assert best.update(0.4, 4, net) and best.epoch == 2
    best.restore(net)
    assert all(torch.equal(net.state_dict()[k], kept[k]) for k in kept)
    assert not BestEpoch(None).update(0.1, 99, net)


def test_cosine_schedule_anneals_to_zero_and_holds():
    from tasks.learn.metrics import cosine_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = cosine_schedule(opt, 10)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.4 and abs(lrs[5] - 0.2) < 1e-12 and lrs[10] == lrs[11] == 0.0
