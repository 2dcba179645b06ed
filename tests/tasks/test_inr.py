"""INR weight datasets: batched fitting, shards, determinism, resume, WeightDataset."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch_geometric.loader import DataLoader

from metanet.cli import main
from metanet.io import CheckpointError
from tasks.datasets.inr import (
    INRConfig,
    Siren,
    WeightDataset,
    collate_features,
    fit_sirens,
    image_grid,
    make_dataset,
    sine_targets,
    siren_space,
)

TINY = INRConfig(hidden=16, depth=2, steps=30, lr=1e-3)


def test_batched_fitting_is_independent_and_matches_the_module():
    coords = image_grid(8, 8)
    targets = torch.rand(5, 64, 1, generator=torch.Generator().manual_seed(0))
    together, psnr = fit_sirens(targets, coords, [10, 11, 12, 13, 14], TINY)
    alone, psnr1 = fit_sirens(targets[3:4], coords, [13], TINY)
    for k in together:
        torch.testing.assert_close(together[k][3], alone[k][0], rtol=0, atol=1e-5)
    model = Siren(TINY)
    model.load_state_dict({k: v[3] for k, v in together.items()})
    mse = (model(coords) - targets[3]).pow(2).mean()
    torch.testing.assert_close(-10 * torch.log10(mse), psnr[3], rtol=1e-4, atol=1e-4)
    assert set(together) == set(siren_space(TINY).tensors)


def test_early_stopping_is_per_inr():
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:6], dtype=torch.float32) / 16
    targets = images.reshape(6, -1, 1)
    cfg = INRConfig(hidden=16, steps=400, target_psnr=25.0)
    together, psnr = fit_sirens(targets, image_grid(8, 8), range(6), cfg)
    stopped = psnr >= 25
    assert stopped.sum() >= 4 and (psnr[stopped] < 26).all()  # stopped once at the target
    again, _ = fit_sirens(targets, image_grid(8, 8), range(6), cfg)
    assert all(torch.equal(together[n], again[n]) for n in together)  # bit-identical rerun
    k = int(stopped.nonzero()[0])
    alone, _ = fit_sirens(targets[k : k + 1], image_grid(8, 8), [k], cfg)
    for n in together:  # stopping one INR leaves the others' training alone
        torch.testing.assert_close(together[n][k], alone[n][0], rtol=0, atol=1e-5)
    # without the target they keep going
    _, longer = fit_sirens(targets, image_grid(8, 8), range(6), replace(cfg, target_psnr=None))
    assert (longer[stopped] > psnr[stopped] + 1).all()


def test_dws_variant_matches_the_module():
    cfg = INRConfig(hidden=16, steps=20)
    assert cfg.variant == "dws" and cfg.offset == 0.5
    coords = image_grid(8, 8)
    targets = torch.rand(2, 64, 1, generator=torch.Generator().manual_seed(0))
    w, psnr = fit_sirens(targets, coords, [0, 1], cfg)
    model = Siren(cfg)
    model.load_state_dict({k: v[1] for k, v in w.items()})
    mse = (model(coords) - targets[1]).pow(2).mean()
    torch.testing.assert_close(-10 * torch.log10(mse), psnr[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="variant"):
        INRConfig(variant="nope")
    # the public batched forward draws what each module draws
    from tasks.datasets.inr import siren_forward

    for b in range(2):
        model.load_state_dict({k: v[b] for k, v in w.items()})
        torch.testing.assert_close(siren_forward(cfg, w, coords)[b], model(coords))


def test_fitting_reaches_a_real_psnr_on_digits():
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:32], dtype=torch.float32) / 16
    _, psnr = fit_sirens(images.reshape(32, -1, 1), image_grid(8, 8), range(32), INRConfig())
    assert psnr.mean() >= 39.9 and psnr.min() > 30  # the default stops each INR at 40 dB


def test_sine_wave_inrs():
    targets, coords, ab = sine_targets(16, seed=1)
    assert targets.shape == (16, 64, 1) and coords.shape == (64, 1) and ab.shape == (16, 2)
    cfg = INRConfig(in_features=1, hidden=16, depth=2, steps=200)
    _, psnr = fit_sirens(targets, coords, range(16), cfg)
    assert psnr.mean() > 25


def test_shards_are_deterministic_and_resume(tmp_path):
    quick = INRConfig(hidden=8, depth=1, steps=10)
    kw = dict(per_image=1, cfg=quick, num_shards=60, progress=False)
    first = make_dataset(tmp_path / "a", shard=(3, 60), **kw)[0]
    again = make_dataset(tmp_path / "b", shard=(3, 60), **kw)[0]
    assert first.read_bytes() == again.read_bytes()  # rerun: bit-identical
    with pytest.raises(CheckpointError, match="missing"):
        WeightDataset(tmp_path / "a")  # an interrupted run is not a dataset yet
    stamp = first.stat().st_mtime_ns
    paths = make_dataset(tmp_path / "a", **kw)  # resume: the other 59 shards are made
    assert len(paths) == 60 and first.stat().st_mtime_ns == stamp  # shard 3 was not redone
    assert len(WeightDataset(tmp_path / "a")) == 1797
    with pytest.raises(CheckpointError, match="other settings"):
        make_dataset(tmp_path / "a", per_image=2, cfg=quick, num_shards=60, progress=False)


def test_weight_dataset_formats_and_augmentation(tmp_path):
    root = tmp_path / "inr"
    main(
        [
            "inr",
            "make",
            str(root),
            "--per-image",
            "1",
            "--num-shards",
            "2",
            "--width",
            "16",
            "--depth",
            "2",
            "--steps",
            "20",
            "-q",
        ]
    )
    assert len(list(root.glob("shard-*.safetensors"))) == 2
    main(["inr", "info", str(root)])
    train = WeightDataset(root, split="train")
    test = WeightDataset(root, split="test")
    assert len(train) + len(test) + len(WeightDataset(root, split="val")) == 1797
    assert {r["image"] for r in train.rows}.isdisjoint({r["image"] for r in test.rows})
    w, label = train[0]
    assert 0 <= int(label) <= 9 and w["net.0.weight"].shape == (16, 2)

    # augmentation relabels hidden units: a different tensor, the same function
    aug = WeightDataset(root, split="train", augment=True, seed=1)
    wa, _ = aug[0]
    assert not torch.equal(wa["net.0.weight"], w["net.0.weight"])
    cfg = INRConfig(hidden=16, depth=2)
    m1, m2 = Siren(cfg), Siren(cfg)
    m1.load_state_dict(w)
    m2.load_state_dict(wa)
    coords = image_grid(8, 8)
    torch.testing.assert_close(m1(coords), m2(coords), rtol=1e-5, atol=1e-5)

    graphs = WeightDataset(root, split="test", format="graph")
    batch = next(iter(DataLoader([graphs[i] for i in range(4)], batch_size=4)))
    assert batch.num_graphs == 4 and batch.y.shape == (4,)
    feats = WeightDataset(root, split="test", format="features")
    x, y = collate_features([feats[i] for i in range(3)])
    assert x["net.0.weight"].shape == (3, 1, 16, 2) and y.shape == (3,)
    flat = WeightDataset(root, split="test", format="flat")
    assert flat[0][0].shape == (sum(t.numel() for t in w.values()),)


def test_cli_inr_make_defaults_are_the_library_defaults(tmp_path):
    """`metanet inr make` with no fitting flags records INRConfig()'s recipe (the two used
    to disagree), and --target-psnr 0 turns early stopping off."""
    import json

    from metanet.cli import main
    from tasks.datasets.inr import INRConfig

    root = tmp_path / "d"
    main(["inr", "make", str(root), "--per-image", "1", "--shard", "0/50", "--steps", "2", "-q"])
    cfg = json.loads((root / "dataset.json").read_text())["config"]
    expected = {**__import__("dataclasses").asdict(INRConfig()), "steps": 2}
    assert cfg == expected
    root2 = tmp_path / "e"
    main(["inr", "make", str(root2), "--per-image", "1", "--shard", "0/50", "--steps", "2",
          "--target-psnr", "0", "-q"])  # fmt: skip
    assert json.loads((root2 / "dataset.json").read_text())["config"]["target_psnr"] is None
