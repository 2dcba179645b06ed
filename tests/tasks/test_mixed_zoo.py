"""Mixed-architecture zoo: real ResNet/ViT networks, vmap training, one GMN across families."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.datasets import digits
from tasks.datasets.inr import WeightDataset
from tasks.datasets.mixed_zoo import ARCHITECTURES, fit_mixed, make_mixed_zoo, train_batched
from tasks.datasets.zoo import Family, make_varied_zoo, sample_hparams


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    make_mixed_zoo(root / "mixed", 12, num_shards=1, max_steps=6, progress=False)
    cnn = (Family("cnn", 2, 4, ("relu", "tanh"), (4, 8)),)
    make_varied_zoo(root / "cnn", 12, families=cnn, num_shards=1, progress=False)
    return root


def test_mixed_families_are_real_networks(mixed, tmp_path):
    """Each architecture's folder holds its own WeightSpace; the recorded accuracies are
    those of the module itself; a rerun is bit-identical."""
    data = digits.load(0.25, seed=0)
    for arch in ARCHITECTURES:
        ds = WeightDataset(mixed / "mixed" / arch.name)
        model = arch.build().eval()
        assert set(ds.tensors) == {n for n, _ in model.named_parameters()}
        for i in (0, 5):
            model.load_state_dict(ds.weights(i))
            with torch.no_grad():
                acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean()
            assert float(acc) == pytest.approx(ds.rows[i]["accuracy"], abs=1e-6)
    make_mixed_zoo(tmp_path, 12, num_shards=1, max_steps=6, progress=False)
    for p in sorted((mixed / "mixed").rglob("shard-*")):
        assert p.read_bytes() == (tmp_path / p.relative_to(mixed / "mixed")).read_bytes()


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_vmap_training_matches_one_model_alone(arch):
    data = digits.load(0.25, seed=0)
    hps = [h for h in (sample_hparams(i, arch) for i in range(30)) if h.batch_size == 16][:3]
    hps = [type(h)(**{**h.__dict__, "steps": 3 + 2 * k}) for k, h in enumerate(hps)]
    together = train_batched(arch, hps, data)
    alone = train_batched(arch, hps[1:2], data)
    # the networks compute the same function (weights may not agree where the gradient is
    # exactly zero in theory, e.g. attention's key bias: Adam turns float noise there into
    # steps of size lr, which change nothing the network computes)
    model = arch.build().eval()
    outs = []
    for w in ({k: v[1] for k, v in together.items()}, {k: v[0] for k, v in alone.items()}):
        model.load_state_dict(w)
        with torch.no_grad():
            outs.append(model(data.x_test))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(
        together["head.weight"][1], alone["head.weight"][0], rtol=0, atol=1e-5
    )
    assert not torch.equal(together["head.weight"][0], together["head.weight"][1])


def test_one_gmn_on_mixed_architectures(mixed):
    """CNN, ResNet-like and ViT-like graphs batch together; one GMN trains end to end and
    reports τ pooled and per family."""
    roots = [mixed / "cnn" / "cnn"] + [mixed / "mixed" / a.name for a in ARCHITECTURES]
    r = fit_mixed(roots, epochs=2, patience=None, batch_size=8, hidden=8)
    assert set(r.family_tau) == {"cnn", "resnet", "vit"}
    assert math.isfinite(r.test_kendall_tau) and -1 <= r.test_kendall_tau <= 1
    assert len(r.history) == 2 and all(math.isfinite(h["train_loss"]) for h in r.history)
