"""CNN zoo: determinism, resume, real accuracies, Kendall τ regression, benchmark smoke."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.datasets import digits
from tasks.datasets.inr import WeightDataset
from tasks.datasets.zoo import (
    VARIED,
    Family,
    accuracy,
    make_varied_zoo,
    make_zoo,
    sample_hparams,
    train_cnns,
    zoo_cnn,
    zoo_space,
)
from tasks.learn.train import train

SMALL = (Family("a", 2, 4, ("relu", "tanh", "gelu"), (5, 12)), Family("b", 3, 3, ("tanh",), (5, 9)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    make_zoo(root, 16, seed=0, num_shards=2, max_steps=8, progress=False)
    return root


def test_rerun_is_bit_identical_and_resumes(zoo, tmp_path):
    paths = make_zoo(tmp_path, 16, seed=0, num_shards=2, max_steps=8, progress=False)
    for p in paths:  # same seed, another folder: the same bytes
        assert p.read_bytes() == (zoo / p.name).read_bytes()
    first = paths[0].stat().st_mtime_ns
    paths[1].unlink()  # an interrupted run: shard 1 never finished
    make_zoo(tmp_path, 16, seed=0, num_shards=2, max_steps=8, progress=False)
    assert paths[0].stat().st_mtime_ns == first  # finished shard not redone
    assert paths[1].read_bytes() == (zoo / paths[1].name).read_bytes()
    with pytest.raises(Exception, match="other settings"):
        make_zoo(tmp_path, 24, seed=1, num_shards=2, max_steps=12, progress=False)


def test_recorded_accuracies_are_real(zoo):
    ds = WeightDataset(zoo)
    assert set(ds.tensors) == set(zoo_space().tensors)
    data = digits.load(0.25, seed=0)
    accs = [r["accuracy"] for r in ds.rows]
    assert len(set(accs)) > 3  # recipes differ
    for i in (0, 13):
        model = zoo_cnn().eval()
        model.load_state_dict(ds.weights(i))
        with torch.no_grad():
            acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean()
        assert float(acc) == pytest.approx(ds.rows[i]["accuracy"], abs=1e-6)
        assert ds.rows[i]["label"] == min(9, int(ds.rows[i]["accuracy"] * 10))


def test_batched_training_matches_one_model_alone():
    data = digits.load(0.25, seed=0)
    hps = [h for h in (sample_hparams(i) for i in range(40)) if h.batch_size == 32][:4]
    hps = [type(h)(**{**h.__dict__, "steps": 5 + 3 * k}) for k, h in enumerate(hps)]
    together = train_cnns(hps, data)
    alone = train_cnns(hps[2:3], data)
    for k in together:
        torch.testing.assert_close(together[k][2], alone[k][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kind", ["statnn", "unf", "gmn", pytest.param("nfn-hnp", marks=pytest.mark.requires("nfn"))]
)
def test_kendall_tau_regression(zoo, kind):
    r = train(kind, zoo, epochs=1, batch_size=8, target="accuracy", progress=False)
    assert math.isfinite(r.test_kendall_tau) and -1 <= r.test_kendall_tau <= 1
    assert math.isfinite(r.test_mse) and math.isnan(r.test_accuracy)
    assert "val_kendall_tau" in r.history[-1]
    with pytest.raises(ValueError, match="target"):
        train(kind, zoo, epochs=1, target="psnr", progress=False)


def test_benchmark_smoke(zoo, tmp_path):
    import benchmarks.generalization as bench

    out = tmp_path / "gen.md"
    data = tmp_path / "z"  # made by the script
    argv = ["--data", str(data), "--n", "12", "--max-steps", "5", "--seeds", "2"]
    argv += ["--epochs", "1", "--models", "statnn,flat", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert "| StatNN |" in text and "Kendall τ" in text
    assert all(f"| {f.name} |" in text for f in VARIED)  # one row per family
    assert "Beat StatNN" in text


def test_cli_zoo_make(zoo, tmp_path, capsys):
    from metanet.cli import main

    argv = ["zoo", "make", str(tmp_path), "--n", "16", "--num-shards", "2"]
    assert main([*argv, "--max-steps", "8", "-q"]) == 0
    assert "2 shard(s) present" in capsys.readouterr().out
    for p in sorted(tmp_path.glob("shard-*")):
        assert p.read_bytes() == (zoo / p.name).read_bytes()


def test_cli_train_regresses_accuracy(zoo, tmp_path, capsys):
    """`metanet train statnn ZOO --target accuracy` reports Kendall tau, not accuracy."""
    from metanet.cli import main

    out = tmp_path / "run"
    assert main(["train", "statnn", str(zoo), "--target", "accuracy", "--epochs", "1",
                 "--batch-size", "8", "--out", str(out), "-q"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "test Kendall tau" in text and "nan" not in text.split("tau")[1].split(",")[0]


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    make_varied_zoo(root, 12, families=SMALL, num_shards=2, progress=False)
    return root


def test_varied_zoo_rerun_shard_resume(varied, tmp_path):
    """`--shard i/n` makes shard i of every family; the rest resumes; all bit-identical."""
    make_varied_zoo(tmp_path, 12, families=SMALL, num_shards=2, shard=(1, 2), progress=False)
    for fam in SMALL:
        assert not (tmp_path / fam.name / "shard-00000-of-00002.safetensors").exists()
    make_varied_zoo(tmp_path, 12, families=SMALL, num_shards=2, progress=False)
    for p in sorted(varied.rglob("shard-*")):
        assert p.read_bytes() == (tmp_path / p.relative_to(varied)).read_bytes()
    with pytest.raises(Exception, match="other settings"):
        make_varied_zoo(tmp_path, 12, families=SMALL[:1], num_shards=2, progress=False)


def test_varied_families_are_real_networks(varied):
    """Every family folder is a WeightDataset of its own architecture; each CNN's recorded
    accuracy is that of the module with its own activation; activations vary."""
    data = digits.load(0.25, seed=0)
    for fam in SMALL:
        ds = WeightDataset(varied / fam.name)
        assert set(ds.tensors) == set(fam.names) and ds.space == zoo_space(fam)
        acts = [r["activation"] for r in ds.rows]
        assert set(acts) <= set(fam.activations)
        for i in range(0, len(ds), 5):
            model = zoo_cnn(fam, acts[i]).eval()
            model.load_state_dict(ds.weights(i))
            with torch.no_grad():
                acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean()
            assert float(acc) == pytest.approx(ds.rows[i]["accuracy"], abs=1e-6)
    assert len({r["activation"] for r in WeightDataset(varied / "a").rows}) > 1


def test_mixed_activation_space_claims_permutations_only():
    """A family whose models draw different activations shares no scaling/sign action; its
    permutations still leave every activation's network unchanged (float64)."""
    from metanet.testing import assert_function_preserved

    fam = VARIED[1]
    space = zoo_space(fam)
    assert all(g.action is None for g in space.groups.values())
    assert any(g.action for g in zoo_space(Family("r", 3, 8)).groups.values())  # ReLU alone
    for act in fam.activations:
        assert_function_preserved(zoo_cnn(fam, act), space, torch.randn(3, 1, 8, 8))


def test_batched_mixed_activations_match_each_model_alone():
    """Models of several activations, sorted or not, train in one batch as they would alone;
    their probe features (cnn_probe_features) permute with the hidden channels."""
    from tasks.learn.generalization import cnn_probe_features

    fam = VARIED[2]
    data = digits.load(0.25, seed=0)
    hps = [h for h in (sample_hparams(i, fam) for i in range(60)) if h.batch_size == 32][:5]
    hps = [type(h)(**{**h.__dict__, "steps": 4 + 2 * k}) for k, h in enumerate(hps)]
    assert len({h.activation for h in hps}) > 1
    together = train_cnns(hps, data, family=fam)
    for j in (0, 3):
        alone = train_cnns(hps[j : j + 1], data, family=fam)
        for k in together:
            torch.testing.assert_close(together[k][j], alone[k][0], rtol=0, atol=1e-5)
    acts = tuple(h.activation for h in hps)
    x = data.x_train[:6]
    feats = cnn_probe_features(fam, together, list(acts), x)
    acc, _ = accuracy(together, data.x_test, data.y_test, fam, acts)
    space = zoo_space(fam)
    element = space.random_element(torch.Generator().manual_seed(0))
    permuted = {k: torch.stack([space.apply(
        {n: t[b] for n, t in together.items()}, element)[k] for b in range(len(hps))])
        for k in together}  # fmt: skip
    feats_p = cnn_probe_features(fam, permuted, list(acts), x)
    out = f"probe:{fam.layers[-1]}"
    torch.testing.assert_close(feats_p[out], feats[out], rtol=0, atol=1e-5)
    for prefix in fam.layers[:-1]:
        h, hp = feats[f"probe:{prefix}"], feats_p[f"probe:{prefix}"]
        # where the permutation sends each channel: apply it to the channel indices
        bias = f"{prefix}.bias"
        where = space.apply(
            {**{n: t[0] for n, t in together.items()}, bias: torch.arange(fam.width).float()},
            element,
        )[bias].long()
        assert not torch.equal(where, torch.arange(fam.width))
        torch.testing.assert_close(hp, h[:, where], rtol=0, atol=1e-5)  # permuted, not changed
    assert torch.equal(acc, accuracy(permuted, data.x_test, data.y_test, fam, acts)[0])
