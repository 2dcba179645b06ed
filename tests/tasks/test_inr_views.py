"""benchmarks/inr_views.py: more INRs of the training images, joined to a base INR set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.datasets.inr import INRConfig, WeightDataset, make_dataset

ROOT = Path(__file__).resolve().parents[2]
CFG = INRConfig(hidden=8, depth=1, steps=3)


def _views():
    spec = importlib.util.spec_from_file_location("inr_views", ROOT / "benchmarks" / "inr_views.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(0)
    source = tmp / "images.npz"
    np.savez(source, images=rng.integers(0, 255, (20, 6, 6), dtype=np.uint8),
             labels=np.arange(20) % 4)  # fmt: skip
    make_dataset(tmp / "base", per_image=1, cfg=CFG, images=source, num_shards=2, progress=False)
    return tmp, source


def test_views_join_the_training_split_only(base):
    tmp, source = base
    views = _views()
    views.main(["images", str(tmp / "base"), str(source), str(tmp / "train.npz")])
    index = np.load(tmp / "train.npz")["index"]
    before = WeightDataset(tmp / "base")
    train_images = sorted(r["image"] for r in before.rows if r["split"] == "train")
    assert index.tolist() == train_images
    fit = ["fit", str(tmp / "base"), str(tmp / "train.npz"), str(tmp / "views")]
    views.main([*fit, "--per-image", "2", "--seed", "1", "--num-shards", "1"])
    views.main(["join", str(tmp / "base"), str(tmp / "views"), str(tmp / "train.npz"),
                str(tmp / "joined")])  # fmt: skip
    joined = WeightDataset(tmp / "joined")
    count = {s: sum(r["split"] == s for r in joined.rows) for s in ("train", "val", "test")}
    base_count = {s: sum(r["split"] == s for r in before.rows) for s in count}
    assert count == {**base_count, "train": 3 * base_count["train"]}
    # every view is of a training image, with its label, and new weights (another seed)
    labels = np.load(source)["labels"]
    added = joined.rows[len(before.rows) :]
    assert {r["image"] for r in added} == set(train_images)
    assert all(r["label"] == labels[r["image"]] for r in added)
    assert not {r["seed"] for r in added} & {r["seed"] for r in before.rows}
    for name, t in before.tensors.items():  # the base's INRs come through unchanged
        assert torch.equal(joined.tensors[name][: len(before)], t)
    assert not torch.equal(
        joined.tensors["net.0.weight"][len(before)], joined.tensors["net.0.weight"][0]
    )


def test_views_of_other_images_or_recipes_are_refused(base, tmp_path):
    """Views of a test image, views fitted another way, or with the base's own seeds are
    refused in one line, with nothing written."""
    tmp, source = base
    views = _views()
    with pytest.raises(SystemExit, match="own"):  # the base's seed repeats its INRs
        views.main(["fit", str(tmp / "base"), str(source), str(tmp_path / "v"), "--seed", "0"])
    # views of every image (test images too) are not training views
    make_dataset(tmp_path / "all", per_image=1, cfg=CFG, images=source, num_shards=1, seed=1,
                 val=0.0, test=0.0, progress=False)  # fmt: skip
    np.savez(tmp_path / "ix.npz", index=np.arange(20))
    with pytest.raises(SystemExit, match="not in .* training split"):
        views.main(["join", str(tmp / "base"), str(tmp_path / "all"), str(tmp_path / "ix.npz"),
                    str(tmp_path / "j")])  # fmt: skip
    other = INRConfig(hidden=8, depth=1, steps=4)
    make_dataset(tmp_path / "other", per_image=1, cfg=other, images=source, num_shards=1,
                 seed=1, val=0.0, test=0.0, progress=False)  # fmt: skip
    with pytest.raises(SystemExit, match="recipe"):
        views.main(["join", str(tmp / "base"), str(tmp_path / "other"), str(tmp_path / "ix.npz"),
                    str(tmp_path / "j2")])  # fmt: skip
    assert not list(tmp_path.glob("j*"))  # nothing written on a refusal
