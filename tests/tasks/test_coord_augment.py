"""Coordinate augmentation of INR weights: ``x -> f(A x + t)`` made exactly in the first
layer, and the training samples ``WeightDataset(coords=...)`` draws from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metanet import canonicalize_sign
from tasks.datasets.inr import (
    CoordAugment,
    INRConfig,
    Siren,
    WeightDataset,
    image_grid,
    make_dataset,
    siren_forward,
    siren_space,
    transform_coords,
    transform_values,
)
from tasks.learn.train import train


@pytest.fixture(scope="module")
def inrs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inrs")
    make_dataset(
        root, per_image=1, cfg=INRConfig(hidden=8, depth=2, steps=30), num_shards=2, progress=False
    )
    return root


def _stacked(cfg: INRConfig, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    nets = [Siren(cfg).double() for _ in range(n)]
    return {k: torch.stack([m.state_dict()[k] for m in nets]) for k in nets[0].state_dict()}


def test_transform_coords_draws_the_image_through_the_affine_map():
    cfg = INRConfig()
    w = _stacked(cfg, 5)
    gen = torch.Generator().manual_seed(1)
    matrix, shift = CoordAugment(rotate=30, scale=0.3, shear=0.3, shift=0.3).sample(5, 2, gen)
    moved = transform_coords(w, matrix, shift)
    x = image_grid(8, 8).double()
    want = torch.stack(
        [
            siren_forward(cfg, {k: v[i : i + 1] for k, v in w.items()}, x @ matrix[i].T + shift[i])[
                0
            ]
            for i in range(5)
        ]
    )
    torch.testing.assert_close(siren_forward(cfg, moved, x), want, rtol=1e-12, atol=1e-12)
    # only the input layer changes; the identity map changes nothing
    assert all(moved[k] is w[k] for k in w if not k.startswith("net.0."))
    same = transform_coords(w, torch.eye(2).expand(5, 2, 2), torch.zeros(5, 2))
    for k in w:
        torch.testing.assert_close(same[k], w[k], rtol=0, atol=0)
    # one INR, no batch axis
    one = transform_coords({k: v[0] for k, v in w.items()}, matrix[0], shift[0])
    torch.testing.assert_close(one["net.0.weight"], moved["net.0.weight"][0])


def test_transform_coords_commutes_with_the_space_symmetries():
    """Permuting (or sign-flipping) hidden neurons and transforming the coordinates are
    independent: the augmentation maps a network's twins to the twins of its image."""
    from metanet import apply_signs, random_signs

    space = siren_space()
    w = _stacked(INRConfig(), 3, seed=2)
    gen = torch.Generator().manual_seed(0)
    matrix, shift = CoordAugment().sample(3, 2, gen)
    g = space.random_element(gen)
    a = transform_coords(space.apply(w, g), matrix, shift)
    b = space.apply(transform_coords(w, matrix, shift), g)
    signs = random_signs(space, gen, batch=(3,))
    c = transform_coords(apply_signs(w, space, signs), matrix, shift)
    d = apply_signs(transform_coords(w, matrix, shift), space, signs)
    for k in w:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c[k], d[k], rtol=1e-12, atol=1e-12)


def test_transform_coords_errors_name_the_layer_and_shapes():
    w = {k: v for k, v in _stacked(INRConfig(), 1).items()}
    with pytest.raises(KeyError, match="net.9.weight"):
        transform_coords(w, torch.eye(2), torch.zeros(2), layer="net.9")
    with pytest.raises(ValueError, match=r"reads 2 coordinates.*\(3, 3\)"):
        transform_coords(w, torch.eye(3), torch.zeros(3))
    with pytest.raises(ValueError, match="rotate and shear act on 2-D"):
        CoordAugment().sample(4, 3)
    m, t = CoordAugment(rotate=0, shear=0).sample(4, 3)
    assert m.shape == (4, 3, 3) and t.shape == (4, 3)


def test_coord_augment_draws_within_its_ranges():
    aug = CoordAugment(rotate=10, scale=0.2, shear=0.0, shift=0.05)
    m, t = aug.sample(2000, 2, torch.Generator().manual_seed(0))
    det = torch.linalg.det(m)  # rotation: det 1; scale s: det s²
    s = det.sqrt()
    assert s.min() >= 1 / 1.2 - 1e-9 and s.max() <= 1.2 + 1e-9
    angle = torch.atan2(m[:, 1, 0], m[:, 0, 0]).abs()
    assert angle.max() <= math.radians(10) + 1e-9 and angle.max() > math.radians(9)
    assert t.abs().max() <= 0.05 and t.abs().max() > 0.045
    # reproducible from the generator
    m2, t2 = aug.sample(2000, 2, torch.Generator().manual_seed(0))
    assert torch.equal(m, m2) and torch.equal(t, t2)


@pytest.mark.parametrize("probes", [0, 16])
def test_dataset_samples_are_transformed_canonical_and_standardized(inrs, probes):
    cfg = INRConfig(**json.loads((Path(inrs) / "dataset.json").read_text())["config"])
    kw = dict(standardize=True, canonicalize=True, probes=probes, dtype=torch.float64)
    plain = WeightDataset(inrs, "train", **kw)
    none = WeightDataset(inrs, "train", coords=CoordAugment(0, 0, 0, 0), **kw)
    aug = WeightDataset(inrs, "train", coords=CoordAugment(), seed=5, **kw)
    assert none.space.tensors.keys() == plain.space.tensors.keys() == aug.space.tensors.keys()
    idx = [0, 3, 7]
    # the identity map gives the stored samples back (those were standardized in float32)
    for k, v in none.gather(idx).items():
        torch.testing.assert_close(v, plain.tensors[k][idx], rtol=1e-6, atol=1e-6)
    state = aug.generator.get_state()
    a, b = aug.gather(idx), aug.gather(idx)
    assert not torch.equal(a["net.0.weight"], b["net.0.weight"])  # a fresh map per draw
    # the output bias no sign flip or input map touches
    torch.testing.assert_close(a["net.4.bias"], plain.tensors["net.4.bias"][idx])
    raw = {k: v * aug.stats[k][1] + aug.stats[k][0] for k, v in a.items()}
    weights = {k: raw[k] for k in aug.base_space.tensors}
    # sign canonical: canonicalizing again changes nothing
    again = canonicalize_sign(weights, aug.base_space)
    for k in weights:
        torch.testing.assert_close(again[k], weights[k], rtol=0, atol=0)
    # each sample draws its INR's image through the affine map drawn for it
    gen = torch.Generator()
    gen.set_state(state)
    matrix, shift = aug.coords.sample(len(idx), 2, gen)
    raw_ds = WeightDataset(inrs, "train", dtype=torch.float64)  # stored float32, exact
    stored = {k: raw_ds.tensors[k][idx] for k in weights}
    x = image_grid(8, 8).double()
    for i in range(len(idx)):
        one = {k: v[i : i + 1] for k, v in stored.items()}
        want = siren_forward(cfg, one, x @ matrix[i].T + shift[i])
        got = siren_forward(cfg, {k: v[i : i + 1] for k, v in weights.items()}, x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if probes:  # probe features are those of the transformed INR
        from metanet.probe import probe_features

        model, inputs = aug._probe
        want = probe_features(model, aug.base_space, weights, inputs.double())
        for k, v in want.items():
            torch.testing.assert_close(raw[k], v, rtol=1e-9, atol=1e-9)
    assert aug[0][1] == plain[0][1]  # the label is kept


def test_coords_refused_on_a_dataset_that_is_not_of_inrs(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"num_shards": 0}))
    (tmp_path / "space.json").write_text(siren_space().to_json())
    with pytest.raises(ValueError, match="not an INR dataset"):
        WeightDataset(tmp_path, coords=CoordAugment())


@pytest.mark.parametrize("kind", ["unf", "gmn"])
def test_train_with_coordinate_augmentation(inrs, tmp_path, kind):
    r = train(
        kind,
        inrs,
        epochs=2,
        batch_size=32,
        limit=64,
        progress=False,
        canonicalize=True,
        coords=True,
        probes=8 if kind == "gmn" else 0,
    )
    assert len(r.history) == 2 and 0 <= r.test_accuracy <= 1
    with pytest.raises(TypeError, match="CoordAugment"):
        train(kind, inrs, epochs=1, batch_size=32, limit=64, progress=False, coords=0.1)


def test_cli_augment_coords(inrs, tmp_path):
    from metanet.cli import main

    argv = ["train", "unf", str(inrs), "--augment-coords", "--canonicalize", "--epochs", "1"]
    assert main([*argv, "--limit", "64", "--batch-size", "32", "-q", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["epochs"] == 1
    # with fields: the output layer's contrast and brightness too
    spec = "rotate=5,contrast=0.2,brightness=0.1"
    argv = ["train", "unf", str(inrs), "--augment-coords", spec, "--epochs", "1", "-q"]
    assert main([*argv, "--limit", "64", "--batch-size", "32", "--out", str(tmp_path / "v")]) == 0


def test_coord_augment_parse(inrs, tmp_path, capsys):
    from metanet.cli import main

    assert CoordAugment.parse("") == CoordAugment()
    assert CoordAugment.parse("rotate=20, contrast=0.2") == CoordAugment(rotate=20, contrast=0.2)
    for bad in ("spin=3", "rotate=a", "rotate"):
        with pytest.raises(ValueError, match="K among rotate, scale, shear, shift, contrast"):
            CoordAugment.parse(bad)
    argv = ["train", "unf", str(inrs), "--augment-coords", "spin=3", "--out", str(tmp_path)]
    assert main(argv) != 0
    assert "--augment-coords: coordinate augmentation 'spin=3'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_transform_values_changes_contrast_and_brightness_exactly():
    cfg = INRConfig()  # "dws": +0.5 after the output layer
    w = _stacked(cfg, 4, seed=3)
    gen = torch.Generator().manual_seed(2)
    aug = CoordAugment(rotate=0, scale=0, shear=0, shift=0, contrast=0.3, brightness=0.2)
    assert aug.changes_values and not CoordAugment().changes_values
    gain, bias = aug.sample_values(4, gen)
    assert gain.min() >= 1 / 1.3 - 1e-12 and gain.max() <= 1.3 + 1e-12
    assert bias.abs().max() <= 0.2
    x = image_grid(8, 8).double()
    moved = transform_values(w, gain, bias, "net.4", cfg.offset)
    want = gain[:, None, None] * siren_forward(cfg, w, x) + bias[:, None, None]
    torch.testing.assert_close(siren_forward(cfg, moved, x), want, rtol=1e-12, atol=1e-12)
    assert all(moved[k] is w[k] for k in w if not k.startswith("net.4."))
    # one INR, no batch axis
    one = transform_values({k: v[0] for k, v in w.items()}, gain[0], bias[0], "net.4", 0.5)
    torch.testing.assert_close(one["net.4.bias"], moved["net.4.bias"][0])
    with pytest.raises(ValueError, match=r"net\.4\.weight has batch shape \(4,\)"):
        transform_values(w, gain[:2], bias[:2], "net.4")
    with pytest.raises(KeyError, match="no output layer 'net.6.weight'"):
        transform_values(w, gain, bias, "net.6")


def test_dataset_samples_with_values_draw_the_changed_image(inrs):
    cfg = INRConfig(**json.loads((Path(inrs) / "dataset.json").read_text())["config"])
    aug = CoordAugment(contrast=0.5, brightness=0.2)
    ds = WeightDataset(inrs, "train", coords=aug, seed=4, dtype=torch.float64)
    state = ds.generator.get_state()
    idx = [1, 2, 5]
    got = ds.gather(idx)
    gen = torch.Generator()
    gen.set_state(state)
    matrix, shift = aug.sample(3, 2, gen)
    gain, bias = aug.sample_values(3, gen)
    raw = {k: v[idx] for k, v in WeightDataset(inrs, "train", dtype=torch.float64).tensors.items()}
    x = image_grid(8, 8).double()
    want = (
        gain[:, None, None]
        * torch.stack(
            [
                siren_forward(
                    cfg, {k: v[i : i + 1] for k, v in raw.items()}, x @ matrix[i].T + shift[i]
                )[0]
                for i in range(3)
            ]
        )
        + bias[:, None, None]
    )
    torch.testing.assert_close(siren_forward(cfg, got, x), want, rtol=1e-10, atol=1e-10)
