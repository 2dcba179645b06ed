"""Probe features: equivariant by construction, what the network computes, usable by every
model through the space (UNF, GMN), and through the training loop."""

from __future__ import annotations

import pytest
import torch

from converters import from_module
from metanet.nn import UNFLinear
from metanet.probe import ProbeEncoder, probe_features, probe_plan, probe_space, with_probes
from metanet.testing import assert_equivariant
from tasks.datasets.inr import (
    INRConfig,
    Siren,
    WeightDataset,
    make_dataset,
    siren_forward,
    siren_space,
)
from tests.fixtures.architectures import entry

# Linear/Conv models of the zoo (probe features read Linear/Conv layers' activations)
# (the two largest CNNs only in slow runs: their conversion dominates)
PROBED = ["mlp", "siren", "cnn_bn", "resnet20", "vit_tiny"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("vgg11_bn", "mobilenet_v2_like")
]


def _batch(model, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` perturbed copies of the model's weights, stacked (a weight batch)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        noise = (
            0.05 * torch.randn((n, *v.shape), generator=g, dtype=v.dtype)
            if v.is_floating_point()
            else 0
        )
        out[k] = v.expand(n, *v.shape) + noise
    return out


@pytest.mark.parametrize("name", PROBED)
def test_probe_features_permute_with_the_hidden_units(name):
    """Permuting hidden units permutes the probe features (float64), never changes them
    otherwise; every probed set is one the network really has."""
    e = entry(name)
    model = e.build(dtype=torch.float64).eval()
    inputs = e.inputs(dtype=torch.float64)[0]
    space = from_module(e.build(), e.inputs())
    weights = {k: v for k, v in _batch(model, 3, 0).items() if k in space.tensors}
    feats = probe_features(model, space, weights, inputs)
    assert feats, "no neuron set was probed"
    pspace = probe_space(space, feats)
    for s in range(2):
        g = space.random_element(torch.Generator().manual_seed(s))
        moved = probe_features(model, space, space.apply(weights, g), inputs)
        expected = pspace.apply({**weights, **feats}, g)
        for k in feats:
            torch.testing.assert_close(moved[k], expected[k], atol=1e-9, rtol=1e-9)
    # and the features do depend on the weights: a fixed-axis change moves them
    assert any(f.std() > 0 for f in feats.values())


@pytest.mark.parametrize("fixed", ["pool", "flatten"])
@pytest.mark.parametrize("channels", [None, 3])
def test_probe_encoder_summary_is_invariant_and_keeps_fixed_neurons(fixed, channels):
    """The summary is invariant to the space's permutations (float64) and the per-neuron
    encoding equivariant; with ``fixed="flatten"`` the output set's probe values (fixed
    neurons) reach the summary as they are, in order."""
    e = entry("mlp")
    model = e.build(dtype=torch.float64).eval()
    inputs = e.inputs(dtype=torch.float64)[0]
    space = from_module(e.build(), e.inputs())
    weights = {k: v for k, v in _batch(model, 3, 0).items() if k in space.tensors}
    feats = probe_features(model, space, weights, inputs)
    pspace = probe_space(space, feats)
    torch.manual_seed(0)
    enc = ProbeEncoder(pspace, channels, hidden=8, fixed=fixed).double()
    per, summary = enc(feats)
    assert summary.shape == (3, enc.out_features) and summary.std() > 0
    assert (not per) if channels is None else set(per) == set(feats)
    g = space.random_element(torch.Generator().manual_seed(1))
    moved_per, moved = enc(probe_features(model, space, space.apply(weights, g), inputs))
    torch.testing.assert_close(moved, summary, rtol=0, atol=1e-10)
    if per:  # (B, channels, |set|, 1): the set's axis moves as the set
        rows = {k: v[..., 0].transpose(1, 2) for k, v in per.items()}  # (B, |set|, channels)
        expected = probe_space(space, rows).apply({**weights, **rows}, g)
        for k, v in moved_per.items():
            torch.testing.assert_close(v[..., 0].transpose(1, 2), expected[k], rtol=0, atol=1e-10)
    fixed_sets = [k for k, t in pspace.tensors.items() if t.role == "probe" and t.axes[0].is_fixed]
    assert fixed_sets  # the logits
    out = feats[fixed_sets[0]].flatten(1)
    found = any(
        torch.equal(summary[:, i : i + out.shape[1]], out)
        for i in range(summary.shape[1] - out.shape[1] + 1)
    )
    assert found == (fixed == "flatten")


def test_probe_encoder_names_a_bad_fixed_mode():
    e = entry("mlp")
    space = from_module(e.build(), e.inputs())
    feats = probe_features(e.build().eval(), space, e.build().state_dict(), e.inputs()[0])
    with pytest.raises(ValueError, match="fixed='drop'"):
        ProbeEncoder(probe_space(space, feats), None, fixed="drop")


def test_siren_output_probe_is_the_image_at_the_probe_points():
    cfg = INRConfig()
    model = Siren(cfg).double()
    space = siren_space(cfg)
    w = _batch(model, 4, 1)
    coords = torch.rand(9, 2, dtype=torch.float64) * 2 - 1
    feats = probe_features(model, space, w, coords)
    assert set(feats) == {"probe:net.0", "probe:net.2", "probe:net.4"}  # not the input set
    image = siren_forward(cfg, w, coords)[..., 0] - cfg.offset
    torch.testing.assert_close(feats["probe:net.4"][:, 0], image)
    # hidden probes are the sine activations: the next layer's input
    h1 = torch.sin(cfg.w0 * (coords @ w["net.0.weight"].mT + w["net.0.bias"][:, None]))
    torch.testing.assert_close(feats["probe:net.0"], h1.mT)


def test_unknown_set_is_named():
    model = Siren(INRConfig())
    with pytest.raises(ValueError, match="'hidden9'"):
        probe_plan(model, siren_space(), sets=["hidden9"])
    assert set(probe_plan(model, siren_space(), sets=["input"])) == {"input"}


def test_unf_on_a_probe_space_is_equivariant():
    cfg = INRConfig(hidden=8)
    model = Siren(cfg).double()
    space = siren_space(cfg)
    pspace, w = with_probes(model, space, _batch(model, 2, 2), torch.rand(5, 2).double())
    layer = UNFLinear(pspace, 1, 3).double()
    assert_equivariant(layer, pspace, {k: v[:, None] for k, v in w.items()}, atol=1e-9)


@pytest.fixture(scope="module")
def inrs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inrs")
    make_dataset(
        root, per_image=1, cfg=INRConfig(hidden=8, depth=1, steps=20), num_shards=2, progress=False
    )
    return root


def test_dataset_probes_are_canonical_and_standardized(inrs):
    ds = WeightDataset(inrs, "train", canonicalize=True, probes=6, standardize=True)
    assert ds.tensors["probe:net.2"].shape == (len(ds), 1, 6)  # the output neuron
    assert ds.space.tensors["probe:net.0"].role == "probe"
    ref = WeightDataset(inrs, "train", canonicalize=True)
    cfg = INRConfig(**ref.meta["config"])
    coords = torch.rand(6, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    raw = {k: t for k, t in ref.tensors.items()}
    image = siren_forward(cfg, raw, coords)[..., 0] - cfg.offset
    mean, std = ds.stats["probe:net.2"]
    torch.testing.assert_close(
        ds.tensors["probe:net.2"][:, 0] * std + mean, image, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["unf", "gmn"])
def test_train_with_probes_and_early_stopping(inrs, tmp_path, kind):
    r = train_(kind, inrs, tmp_path)
    assert r.history and 0 <= r.test_accuracy <= 1
    # early stopping: the reported val accuracy is the best epoch's
    assert r.val_accuracy == max(h["val_accuracy"] for h in r.history)


def train_(kind, root, out):
    from tasks.learn.train import train

    return train(
        kind,
        root,
        out=out,
        epochs=4,
        batch_size=32,
        limit=128,
        progress=False,
        probes=4,
        patience=1,
        canonicalize=True,
    )


def test_unf_classifier_with_probes_is_invariant():
    """The probe encoder (per-neuron MLP + DeepSets summary) keeps the classifier invariant."""
    from tasks.learn.train import build_model

    cfg = INRConfig(hidden=8)
    model = Siren(cfg).double()
    pspace, w = with_probes(model, siren_space(cfg), _batch(model, 3, 3), torch.rand(5, 2).double())
    torch.manual_seed(0)
    net = build_model("unf", pspace, 4, 4, frequencies=2).double()
    assert net.probes is not None and net.probes.space.tensors["probe:net.4"].shape == (1, 1)
    assert_equivariant(net, pspace, w, atol=1e-9)


def test_parameter_graphs_carry_probes_as_node_columns():
    """A probe space's graph has the probe values as node feature columns; GMN and the
    graph transformer on it stay invariant (float64)."""
    from metanet import to_graph, to_weights
    from metanet.nn import GMN, GraphTransformer

    cfg = INRConfig(hidden=8)
    model = Siren(cfg).double()
    one = {k: v[0] for k, v in _batch(model, 1, 4).items()}
    pspace, w = with_probes(model, siren_space(cfg), one, torch.rand(5, 2).double())
    graph = to_graph(pspace, w)
    back = to_weights(pspace, graph)
    assert all(torch.equal(back[k], w[k].to(back[k].dtype)) for k in w)  # the space's dtypes
    assert graph.x.shape[1] >= 5 + 5  # the fixed columns, then the 5 probe values
    torch.manual_seed(0)
    for net in (
        GMN(
            graph.x.shape[1],
            graph.edge_attr.shape[1],
            hidden=8,
            layers=2,
            out_features=2,
            summary=4,
        ),
        GraphTransformer(graph.x.shape[1], graph.edge_attr.shape[1], hidden=8, heads=2),
    ):
        net = net.double()
        assert_equivariant(lambda v, net=net: net(to_graph(pspace, v)), pspace, w, atol=1e-9)


def test_cli_trains_the_transformer_with_probes(inrs, tmp_path):
    import json

    from metanet.cli import main

    out = tmp_path / "run"
    argv = ["train", "transformer", str(inrs), "--out", str(out), "--epochs", "2", "-q"]
    argv += ["--batch-size", "32", "--limit", "64", "--probes", "4", "--patience", "1"]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["kind"] == "transformer" and 0 <= result["test_accuracy"] <= 1
