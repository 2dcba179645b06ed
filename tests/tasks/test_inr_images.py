"""INR datasets of a user's own images (`metanet inr make --images`), and DWSNets' layout.

Real pixels throughout: scikit-learn's digits, written as PNG files in class folders, as
an .npz, and upsampled to 28×28 for the DWSNets layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metanet.cli import main
from tasks.datasets import inr
from tasks.datasets.field import import_dwsnets_mnist

FAST = inr.INRConfig(steps=20, target_psnr=None)


def _digits(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:n] * (255 / 16)).round().astype(np.uint8), d.target[:n]


def _png_folder(root: Path, colour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = _digits()
    for k, (x, y) in enumerate(zip(images, labels)):
        folder = root / f"class_{y}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(x)
        (im.convert("RGB") if colour and k % 2 else im).save(folder / f"{k:03d}.png")
    return images, labels


def test_folder_of_class_subfolders(tmp_path):
    images, labels = _png_folder(tmp_path / "imgs")
    pixels, got_labels, classes = inr.load_images(tmp_path / "imgs")
    assert pixels.shape == (30, 8, 8, 1) and classes == [f"class_{c}" for c in range(10)]
    # the pixels as written, each under its class index
    order = sorted(range(30), key=lambda k: (labels[k], k))
    assert torch.equal(pixels[..., 0], torch.from_numpy(images[order]).float() / 255)
    assert got_labels == [int(labels[k]) for k in order]

    inr.make_dataset(tmp_path / "ds", images=tmp_path / "imgs", per_image=2, cfg=FAST,
                     num_shards=2, progress=False)  # fmt: skip
    ds = inr.WeightDataset(tmp_path / "ds")
    assert len(ds) == 60 and ds.meta["classes"] == classes
    assert {r["split"] for r in ds.rows} == {"train", "val", "test"}
    for image in {r["image"] for r in ds.rows}:  # split by image: both INRs of one share it
        assert len({r["split"] for r in ds.rows if r["image"] == image}) == 1
    drawn = inr.render(ds)
    assert drawn.shape == (60, 8, 8) and ds.psnr.isfinite().all()


def test_colour_images_fit_one_output_per_channel(tmp_path):
    _png_folder(tmp_path / "imgs", colour=True)  # any colour image: the set is read as RGB
    pixels, _, _ = inr.load_images(tmp_path / "imgs", resolution=6)
    assert pixels.shape == (30, 6, 6, 3)
    inr.make_dataset(tmp_path / "ds", images=tmp_path / "imgs", resolution=6, per_image=1,
                     cfg=FAST, num_shards=1, progress=False)  # fmt: skip
    ds = inr.WeightDataset(tmp_path / "ds")
    assert ds.meta["config"]["out_features"] == 3 and ds.meta["resolution"] == 6
    assert inr.render(ds).shape == (30, 6, 6, 3)


def test_npz_from_the_cli_any_size(tmp_path, capsys):
    images, labels = _digits()
    wide = np.repeat(images, 2, axis=2)  # 8 x 16: not square
    np.savez(tmp_path / "set.npz", images=wide, labels=labels)
    argv = ["inr", "make", str(tmp_path / "ds"), "--images", str(tmp_path / "set.npz"),
            "--per-image", "1", "--steps", "30", "--num-shards", "1", "-q"]  # fmt: skip
    assert main(argv) == 0
    ds = inr.WeightDataset(tmp_path / "ds")
    assert ds.meta["resolution"] == [8, 16] and [r["label"] for r in ds.rows] == labels.tolist()
    assert inr.render(ds).shape == (30, 8, 16)


@pytest.mark.parametrize(
    "make, flags, what",
    [
        (lambda p: np.savez(p / "x.npz", images=np.zeros((3, 4, 4)) + 2.0, labels=np.zeros(3, int)),
         ["x.npz"], "expected [0, 1]"),
        (lambda p: np.savez(p / "x.npz", images=np.zeros((3, 4, 4)), labels=np.zeros(2, int)),
         ["x.npz"], "expected 3 integers"),
        (lambda p: np.savez(p / "x.npz", pictures=np.zeros((3, 4, 4))), ["x.npz"], "'images'"),
        (lambda p: (p / "empty").mkdir(), ["empty"], "no images"),
        (lambda p: _png_folder(p), ["."], "--dwsnets"),
    ],
)  # fmt: skip
def test_bad_images_are_refused_in_one_line(tmp_path, capsys, make, flags, what):
    make(tmp_path)
    extra = ["--dwsnets", str(tmp_path.parent / "dws")] if what == "--dwsnets" else []
    out = tmp_path.parent / f"{tmp_path.name}-out"
    argv = ["inr", "make", str(out), "--images", str(tmp_path / flags[0]), "-q", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert what in err and "\n" not in err
    assert not (out / "space.json").exists()


def test_inputs_are_never_written_into(tmp_path, capsys):
    _png_folder(tmp_path / "imgs")
    argv = ["inr", "make", str(tmp_path / "imgs" / "ds"), "--images", str(tmp_path / "imgs"), "-q"]
    assert main(argv) == 2
    assert "inside the input" in capsys.readouterr().err
    assert not (tmp_path / "imgs" / "ds").exists()


def test_dwsnets_layout_reads_back_bit_for_bit(tmp_path):
    """Written in DWSNets' published layout, read back by the importer of their release:
    the same INRs, bit for bit, with their labels and splits."""
    images, labels = _digits(24)
    big = torch.nn.functional.interpolate(
        torch.from_numpy(images).float()[:, None] / 255, size=(28, 28), mode="bilinear",
        align_corners=True,
    )[:, 0].numpy()  # fmt: skip
    np.savez(tmp_path / "mnist.npz", images=big.astype(np.float32), labels=labels)
    cfg = inr.INRConfig(steps=20, target_psnr=None)
    inr.make_dataset(tmp_path / "ours", images=tmp_path / "mnist.npz", per_image=1, cfg=cfg,
                     num_shards=2, dwsnets=tmp_path / "release", progress=False)  # fmt: skip
    splits = json.loads((tmp_path / "release" / "mnist_splits.json").read_text())
    assert sum(len(v["path"]) for v in splits.values()) == 24
    import_dwsnets_mnist(tmp_path / "release", tmp_path / "back",
                         splits=tmp_path / "release" / "mnist_splits.json", progress=False)  # fmt: skip
    ours, back = inr.WeightDataset(tmp_path / "ours"), inr.WeightDataset(tmp_path / "back")
    assert len(back) == 24
    index = {r["image"]: k for k, r in enumerate(ours.rows)}
    for k, row in enumerate(back.rows):
        mine = index[row["image"]]
        assert row["label"] == ours.rows[mine]["label"] and row["split"] == ours.rows[mine]["split"]
        for name in ours.space.tensors:
            assert torch.equal(back.weights(k)[name], ours.weights(mine)[name]), name
    # both render the same images (DWSNets' coordinates: the column first)
    assert torch.equal(inr.render(back), inr.render(ours)[[index[r["image"]] for r in back.rows]])


def test_28x28_folder_and_32x32_colour_npz(tmp_path):
    """The issue's two settings on a few real images: digits upsampled to 28×28 as PNG
    files in class folders, and 32×32 RGB patches of scikit-learn's sample photographs
    in an .npz."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images, labels = _digits(12)
    for k, (x, y) in enumerate(zip(images, labels)):
        (tmp_path / "mnist" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).resize((28, 28), Image.BILINEAR).save(
            tmp_path / "mnist" / str(y) / f"{k}.png"
        )
    photos = load_sample_images().images
    patches = np.stack(
        [p[r : r + 32, c : c + 32] for p in photos for r, c in [(100, 200), (300, 50)]]
    )
    np.savez(tmp_path / "photos.npz", images=patches, labels=np.array([0, 0, 1, 1]))
    cfg = inr.INRConfig(steps=10, target_psnr=None)
    for src, shape in [("mnist", (12, 28, 28)), ("photos.npz", (4, 32, 32, 3))]:
        out = tmp_path / f"inrs-{src}"
        inr.make_dataset(out, images=tmp_path / src, per_image=1, cfg=cfg, num_shards=1,
                         progress=False)  # fmt: skip
        ds = inr.WeightDataset(out)
        assert inr.render(ds).shape == shape and ds.psnr.isfinite().all()


def test_a_small_release_imports_with_val_size(tmp_path, capsys):
    """A DWSNets-layout set of fewer than 5,000 training INRs and no splits file: the
    importer's default hold-out does not fit, said in one line; --val-size makes it."""
    images, labels = _digits(12)
    big = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)[:, 2:30, 2:30]  # 28 x 28
    np.savez(tmp_path / "mnist.npz", images=big, labels=labels)
    inr.make_dataset(tmp_path / "ours", images=tmp_path / "mnist.npz", per_image=1,
                     cfg=inr.INRConfig(steps=5, target_psnr=None), num_shards=1,
                     dwsnets=tmp_path / "release", progress=False)  # fmt: skip
    argv = ["datasets", "import", "dwsnets-mnist", str(tmp_path / "release"), str(tmp_path / "in")]
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--val-size" in err and "\n" not in err
    assert main([*argv, "--val-size", "2", "-q"]) == 0
    back = inr.WeightDataset(tmp_path / "in")
    assert len(back) == 12 and sum(r["split"] == "val" for r in back.rows) == 2


def test_train_views_fit_more_inrs_of_the_training_images_only(tmp_path, capsys):
    """``--train-views K``: K INRs (distinct fitting seeds, the same image) of each training
    image, ``--per-image`` of the others; the same split and the same first INRs as without
    it, so validation and test compare directly."""
    images, labels = _digits(40)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    common = ["inr", "make", "--images", str(tmp_path / "d.npz"), "--per-image", "1",
              "--steps", "5", "--num-shards", "2", "-q"]  # fmt: skip
    assert main([*common[:2], str(tmp_path / "one"), *common[2:]]) == 0
    assert main([*common[:2], str(tmp_path / "three"), *common[2:], "--train-views", "3"]) == 0
    one, three = inr.WeightDataset(tmp_path / "one"), inr.WeightDataset(tmp_path / "three")
    assert three.meta["train_per_image"] == 3 and "train_per_image" not in one.meta
    split = {r["image"]: r["split"] for r in one.rows}
    assert {r["image"]: r["split"] for r in three.rows} == split
    for image, s in split.items():
        n = sum(r["image"] == image for r in three.rows)
        assert n == (3 if s == "train" else 1), (image, s, n)
    seeds = [r["seed"] for r in three.rows]
    assert len(set(seeds)) == len(seeds)
    # every INR of the one-view set is in the three-view set, bit for bit
    first = {(r["image"], r["seed"]): k for k, r in enumerate(three.rows)}
    for k, r in enumerate(one.rows):
        j = first[(r["image"], r["seed"])]
        assert all(torch.equal(v, three.weights(j)[n]) for n, v in one.weights(k).items())
    assert len(three) == 40 + 2 * sum(s == "train" for s in split.values())
    capsys.readouterr()
    assert main(["inr", "info", str(tmp_path / "three")]) == 0
    assert "3 per training image, 1 per other" in capsys.readouterr().out
    # fewer views than --per-image: refused in one line, nothing written
    capsys.readouterr()
    code = main([*common[:2], str(tmp_path / "bad"), *common[2:4], "--per-image", "2",
                 *common[6:], "--train-views", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--train-views 1" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
