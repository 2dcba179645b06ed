"""The field's datasets: each importer on small files written in the published layout.

The fixtures write what the releases hold, the way their authors' code writes it:
DWSNets' INR (``seq.*`` state dicts, one file per INR in class folders), NFN's SIREN
(``net.*.linear.*``, ``{prefix}_{label}s/net{i}.pth``) and the Small CNN Zoo (a flat
``weights.npy`` of TensorFlow variables, ``metrics.csv.gz``, ``layout.csv`` in the
release's alphabetical variable order). Each imported set must hold the same values
under metanet's names, compute the same function as the original network (float64),
keep the labels/accuracies and splits, and train with ``metanet train``.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from metanet.cli import main
from metanet.io import CheckpointError
from tasks.datasets.field import (
    IMPORTERS,
    import_dataset,
    import_dwsnets_fmnist,
    import_dwsnets_mnist,
    import_nfn_sirens,
    import_small_cnn_zoo,
    small_cnn_zoo_model,
)
from tasks.datasets.inr import INRConfig, WeightDataset, siren_forward
from tasks.learn.train import TrainResult, train

SIREN_NAMES = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
SIREN_NAMES += ["net.4.weight", "net.4.bias"]


# --------------------------------------------------------------------------- the originals
class DWSSineLayer(nn.Module):
    """DWSNets' ``Siren`` layer: ``sin(w0 · (W x + b))`` with ``weight``/``bias`` on itself."""

    def __init__(self, dim_in: int, dim_out: int, w0: float = 30.0):
        super().__init__()
        self.w0 = w0
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in).uniform_(-0.3, 0.3))
        self.bias = nn.Parameter(torch.empty(dim_out).uniform_(-0.1, 0.1))

    def forward(self, x):
        return torch.sin(self.w0 * nn.functional.linear(x, self.weight, self.bias))


class DWSNetsINR(nn.Module):
    """DWSNets' ``INR(in_dim=2, n_layers=3, up_scale=16)``: keys ``seq.{0,1,2}.*``, +0.5."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(DWSSineLayer(2, 32), DWSSineLayer(32, 32), nn.Linear(32, 1))

    def forward(self, x):
        return self.seq(x) + 0.5


def dws_coordinates(side: int) -> torch.Tensor:
    """DWSNets' ``make_coordinates``: ``np.meshgrid`` ('xy'), stacked ``(x, y)``."""
    xs, ys = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side))
    return torch.from_numpy(np.stack([xs.ravel(), ys.ravel()]).T)


class NFNSineLayer(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.linear = nn.Linear(a, b)

    def forward(self, x):
        return torch.sin(30.0 * self.linear(x))


class NFNSiren(nn.Module):
    """NFN's ``Siren(2, 32, hidden_layers=1, out, outermost_linear=True)``."""

    def __init__(self, out: int):
        super().__init__()
        self.net = nn.Sequential(NFNSineLayer(2, 32), NFNSineLayer(32, 32), nn.Linear(32, out))

    def forward(self, x):
        return self.net(x)


def nfn_mgrid(side: int) -> torch.Tensor:
    """NFN's ``get_mgrid``: ``torch.meshgrid`` ('ij'), (row, column)."""
    t = torch.linspace(-1, 1, side, dtype=torch.float64)
    return torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)


def _assert_same_function(original: nn.Module, cfg: INRConfig, w: dict, coords):
    with torch.no_grad():
        want = original.double()(coords)
    got = siren_forward(cfg, {n: t[None].double() for n, t in w.items()}, coords)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _train(root) -> TrainResult:
    """One epoch of ``metanet train statnn`` (its Python face: no curves to draw)."""
    result = train("statnn", root, epochs=1, batch_size=4, progress=False)
    assert result.history[0]["train_loss"] > 0  # batches ran
    return result


# --------------------------------------------------------------------------- DWSNets MNIST
@pytest.fixture(scope="module")
def mnist_inrs(tmp_path_factory):
    """16 INRs in the release's layout: 12 training, 4 testing; {relpath: (label, module)}."""
    src = tmp_path_factory.mktemp("data") / "mnist-inrs"
    torch.manual_seed(0)
    made = {}
    for k in range(16):
        kind, label, image = ("training" if k < 12 else "testing"), k % 10, 100 + 7 * k
        rel = f"mnist_png_{kind}_{label}_{image}/checkpoints/model_final.pth"
        (src / rel).parent.mkdir(parents=True)
        inr = DWSNetsINR()
        torch.save(inr.state_dict(), src / rel)
        made[rel] = (label, image, inr)
    return src, made


def test_dwsnets_mnist_names_values_function_labels_splits(mnist_inrs, tmp_path):
    src, made = mnist_inrs
    paths = import_dwsnets_mnist(src, tmp_path / "ds", val_size=3, shard_size=5, progress=False)
    assert [p.name for p in paths] == [f"shard-0000{i}-of-00004.safetensors" for i in range(4)]
    ds = WeightDataset(tmp_path / "ds")
    assert list(ds.tensors) == SIREN_NAMES
    assert ds.tensors["net.0.weight"].shape == (16, 32, 2)
    assert ds.tensors["net.4.weight"].shape == (16, 1, 32)
    assert ds.meta["source_names"]["net.2.weight"] == "seq.1.weight"
    assert [ds.space.groups[g].action for g in ds.space.groups] == ["sign", "sign"]
    cfg = INRConfig(**ds.meta["config"])
    assert (cfg.variant, cfg.w0, cfg.offset, ds.meta["resolution"]) == ("dws", 30.0, 0.5, 28)
    splits = [r["split"] for r in ds.rows]
    assert splits.count("test") == 4 and splits.count("val") == 3 and splits.count("train") == 9
    coords = dws_coordinates(28)
    for i, row in enumerate(ds.rows):
        label, image, inr = made[row["source"]]
        assert (row["label"], row["image"], int(ds.labels[i])) == (label, image, label)
        assert (row["split"] == "test") == ("testing" in row["source"])
        sd = inr.state_dict()
        for ours, theirs in ds.meta["source_names"].items():
            assert torch.equal(ds.tensors[ours][i], sd[theirs])  # bit for bit
        if i % 5 == 0:
            _assert_same_function(inr, cfg, ds.weights(i), coords)
    assert 0 <= _train(tmp_path / "ds").test_accuracy <= 1


def test_dwsnets_mnist_follows_their_splits_file(mnist_inrs, tmp_path):
    src, made = mnist_inrs
    rels = sorted(made)
    # generate_data_splits.py writes absolute paths and string labels
    chosen = {"train": rels[:10], "val": rels[10:12], "test": rels[12:]}
    splits = {
        s: {
            "path": [f"/home/someone/dataset/mnist-inrs/{r}" for r in v],
            "label": [str(made[r][0]) for r in v],
        }
        for s, v in chosen.items()
    }
    path = tmp_path / "mnist_splits.json"
    path.write_text(json.dumps(splits))
    import_dwsnets_mnist(src, tmp_path / "ds", splits=path, progress=False)
    ds = WeightDataset(tmp_path / "ds")
    assert {s: [r["source"] for r in ds.rows if r["split"] == s] for s in chosen} == chosen
    splits["val"]["label"][0] = str((made[rels[10]][0] + 1) % 10)
    path.write_text(json.dumps(splits))
    with pytest.raises(CheckpointError, match="label .* folder says"):
        import_dwsnets_mnist(src, tmp_path / "other", splits=path, progress=False)


def test_imports_resume_refuse_other_settings_and_never_write_inside_the_input(
    mnist_inrs, tmp_path
):
    src, _ = mnist_inrs
    dst = tmp_path / "ds"
    paths = import_dwsnets_mnist(src, dst, val_size=3, shard_size=8, progress=False)
    first = paths[0].stat().st_mtime_ns
    paths[1].unlink()  # an interrupted import
    again = import_dwsnets_mnist(src, dst, val_size=3, shard_size=8, progress=False)
    assert again == paths and paths[1].exists() and paths[0].stat().st_mtime_ns == first
    with pytest.raises(CheckpointError, match="other settings"):
        import_dwsnets_mnist(src, dst, val_size=4, shard_size=8, progress=False)
    with pytest.raises(CheckpointError, match="inside the input"):
        import_dwsnets_mnist(src, src / "converted", progress=False)
    with pytest.raises(CheckpointError, match="pass SRC/mnist-inrs"):
        import_dwsnets_mnist(src.parent, dst, progress=False)


def test_a_file_that_does_not_fit_is_named(mnist_inrs, tmp_path):
    src, made = mnist_inrs
    bad = tmp_path / "bad"
    for rel in sorted(made)[:3]:
        (bad / rel).parent.mkdir(parents=True)
        (bad / rel).write_bytes((src / rel).read_bytes())
    odd = sorted(made)[2]
    sd = torch.load(bad / odd, weights_only=True)
    sd["seq.1.weight"] = torch.zeros(32, 16)
    torch.save(sd, bad / odd)
    with pytest.raises(CheckpointError, match=rf"{odd}: 'seq.1.weight' has shape \(32, 16\)"):
        import_dwsnets_mnist(bad, tmp_path / "ds", val_size=0, progress=False)


def test_a_source_holding_nan_is_named_and_leaves_no_folder(mnist_inrs, tmp_path):
    """A release file holding NaN is refused naming the networks, and the dataset folder
    this run made is removed (it held only the first shard: rerunning meets the same file)."""
    src, made = mnist_inrs
    bad = tmp_path / "bad"
    for rel in sorted(made):
        (bad / rel).parent.mkdir(parents=True)
        (bad / rel).write_bytes((src / rel).read_bytes())
    odd = sorted(made)[-1]
    sd = torch.load(bad / odd, weights_only=True)
    sd["seq.0.bias"][3] = float("nan")
    torch.save(sd, bad / odd)
    with pytest.raises(CheckpointError, match="1 of the .* networks .* have NaN or inf"):
        import_dwsnets_mnist(bad, tmp_path / "ds", val_size=0, shard_size=8, progress=False)
    assert not (tmp_path / "ds").exists()


# --------------------------------------------------------------------------- DWSNets FMNIST
def test_dwsnets_fmnist_labels_from_the_files(tmp_path):
    src = tmp_path / "fmnist_inrs"
    torch.manual_seed(1)
    listing, made = {"train": [], "val": [], "test": []}, {}
    for k in range(14):
        split = "train" if k < 8 else "val" if k < 10 else "test"
        rel = f"{split}/model_{1000 + k}.pth"
        (src / split).mkdir(parents=True, exist_ok=True)
        inr = DWSNetsINR()
        torch.save({**inr.state_dict(), "label": (3 * k) % 10}, src / rel)
        listing[split].append(f"fmnist_inrs/{rel}")  # the release's splits.json paths
        made[rel] = ((3 * k) % 10, inr)
    (src / "splits.json").write_text(json.dumps(listing))
    import_dwsnets_fmnist(src, tmp_path / "ds", shard_size=6, progress=False)
    ds = WeightDataset(tmp_path / "ds")
    assert list(ds.tensors) == SIREN_NAMES and len(ds) == 14
    assert [r["split"] for r in ds.rows] == ["train"] * 8 + ["val"] * 2 + ["test"] * 4
    cfg = INRConfig(**ds.meta["config"])
    for i, row in enumerate(ds.rows):
        label, inr = made[row["source"]]
        assert row["label"] == label and row["image"] == 1000 + i
        _assert_same_function(inr, cfg, ds.weights(i), dws_coordinates(28))
    _train(tmp_path / "ds")
    listing["test"].append("fmnist_inrs/test/model_9.pth")
    (src / "splits.json").write_text(json.dumps(listing))
    with pytest.raises(CheckpointError, match="model_9.pth .*not found"):
        import_dwsnets_fmnist(src, tmp_path / "other", progress=False)


# --------------------------------------------------------------------------- NFN SIRENs
def test_nfn_cifar_sirens_split_by_index_with_augmented_copies(tmp_path):
    src = tmp_path / "siren_cifar_wts"
    torch.manual_seed(2)
    made = {}
    for copy in ("", "_aug0"):
        for idx in range(12):
            label = (idx * 7) % 10
            d = src / f"randinit_smaller{copy}_{label}s"
            d.mkdir(parents=True, exist_ok=True)
            inr = NFNSiren(3)
            torch.save(inr.state_dict(), d / f"net{idx}.pth")
            made[f"{d.name}/net{idx}.pth"] = (label, idx, inr)
    import_dataset(
        "nfn-siren",
        src,
        tmp_path / "ds",
        split_points=(8, 10),
        augmentations=1,
        shard_size=7,
        progress=False,
    )
    ds = WeightDataset(tmp_path / "ds")
    assert list(ds.tensors) == SIREN_NAMES and ds.tensors["net.4.bias"].shape == (20, 3)
    assert ds.meta["source_names"]["net.0.weight"] == "net.0.linear.weight"
    assert ds.meta["source_names"]["net.4.weight"] == "net.2.weight"
    cfg = INRConfig(**ds.meta["config"])
    assert (cfg.out_features, cfg.offset, ds.meta["resolution"]) == (3, 0.0, 32)
    base = [r for r in ds.rows if r["copy"] is None]
    assert [r["image"] for r in base] == list(range(12))
    assert [r["split"] for r in base] == ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    copies = [r for r in ds.rows if r["copy"] == 0]  # aug0: training images only
    assert [(r["image"], r["split"]) for r in copies] == [(i, "train") for i in range(8)]
    for i, row in enumerate(ds.rows):
        label, idx, inr = made[row["source"]]
        assert (row["label"], row["image"]) == (label, idx)
        if i % 4 == 0:
            _assert_same_function(inr, cfg, ds.weights(i), nfn_mgrid(32))
    _train(tmp_path / "ds")


def test_nfn_mnist_sirens_need_contiguous_indices(tmp_path):
    src = tmp_path / "siren_mnist_wts"
    for idx in (0, 1, 3):
        (src / f"randinit_smaller_{idx}s").mkdir(parents=True)
        torch.save(NFNSiren(1).state_dict(), src / f"randinit_smaller_{idx}s" / f"net{idx}.pth")
    with pytest.raises(CheckpointError, match=r"missing \[2\]"):
        import_nfn_sirens(src, tmp_path / "ds", progress=False)
    torch.save(NFNSiren(1).state_dict(), src / "randinit_smaller_1s" / "net2.pth")
    import_nfn_sirens(src, tmp_path / "ds", split_points=(2, 3), progress=False)
    ds = WeightDataset(tmp_path / "ds")
    assert ds.meta["resolution"] == 28 and ds.meta["config"]["out_features"] == 1
    assert [(r["image"], r["label"], r["split"]) for r in ds.rows] == [
        (0, 0, "train"),
        (1, 1, "train"),
        (2, 1, "val"),
        (3, 3, "test"),
    ]


# --------------------------------------------------------------------------- Small CNN Zoo
ZOO_VARS = [  # the release's layout.csv order (alphabetical) and TensorFlow shapes
    ("sequential/conv2d/bias:0", (16,)),
    ("sequential/conv2d/kernel:0", (3, 3, 1, 16)),
    ("sequential/conv2d_1/bias:0", (16,)),
    ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
    ("sequential/conv2d_2/bias:0", (16,)),
    ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
    ("sequential/dense/bias:0", (10,)),
    ("sequential/dense/kernel:0", (16, 10)),
]
CONFIG_COLUMNS = [
    "config.activation",
    "config.dataset",
    "config.dropout",
    "config.learning_rate",
    "config.optimizer",
    "config.train_fraction",
]
STEPS = (0, 20, 86)


def keras_forward(flat: np.ndarray, activation: str, images: np.ndarray) -> np.ndarray:
    """The zoo's Keras CNN in NumPy on NHWC ``images``: 3×3 stride-2 'valid' convs,
    activation, global average pooling, dense, read straight from the flat vector."""
    var, start = {}, 0
    for name, shape in ZOO_VARS:
        var[name] = flat[start : start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)
    act = {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh}[activation]
    h = images
    for layer in ("conv2d", "conv2d_1", "conv2d_2"):
        win = np.lib.stride_tricks.sliding_window_view(h, (3, 3), axis=(1, 2))[:, ::2, ::2]
        h = act(
            np.einsum("nijcab,abco->nijo", win, var[f"sequential/{layer}/kernel:0"])
            + var[f"sequential/{layer}/bias:0"]
        )
    return h.mean((1, 2)) @ var["sequential/dense/kernel:0"] + var["sequential/dense/bias:0"]


@pytest.fixture(scope="module")
def cnn_zoo(tmp_path_factory):
    """24 networks × 3 checkpoints, rows in a shuffled order, and NFN's split file."""
    src = tmp_path_factory.mktemp("zoo") / "cifar10"
    src.mkdir()
    gen = np.random.default_rng(0)
    width = sum(math.prod(s) for _, s in ZOO_VARS)
    rows = [(net, step) for net in range(24) for step in STEPS]
    gen.shuffle(rows)
    weights = (gen.standard_normal((len(rows), width)) * 0.3).astype(np.float32)
    np.save(src / "weights.npy", weights)
    with gzip.open(src / "metrics.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CONFIG_COLUMNS, "modeldir", "step", "test_accuracy", "test_loss"])
        for net, step in rows:
            act = "tanh" if net % 3 == 0 else "relu"
            acc = round(0.1 + 0.8 * ((net * 37 + step) % 100) / 100, 4)
            w.writerow([act, "cifar10", 0.05, 0.01, "adam", 0.5, f"dir/{net}", step, acc, 1.5])
    with open(src / "layout.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["varname", "start_idx", "end_idx", "shape"])
        start = 0
        for name, shape in ZOO_VARS:
            w.writerow([name, start, start + math.prod(shape), str(shape)])
            start += math.prod(shape)
    order = src / "cifar10_split.csv"
    order.write_text("".join(f"{i}\n" for i in gen.permutation(len(rows))))
    return src, rows, weights, order


def test_small_cnn_zoo_values_function_accuracies_and_nfn_split(cnn_zoo, tmp_path):
    src, rows, weights, order = cnn_zoo
    import_small_cnn_zoo(src, tmp_path / "ds", order=order, shard_size=5, progress=False)
    ds = WeightDataset(tmp_path / "ds")
    model = small_cnn_zoo_model()
    assert {n: tuple(t.shape[1:]) for n, t in ds.tensors.items()} == {
        n: tuple(t.shape) for n, t in model.state_dict().items()
    }
    assert ds.meta["source_names"]["4.weight"] == "sequential/conv2d_2/kernel:0"
    assert ds.space.num_params == 4970
    assert all(g.action is None for g in ds.space.groups.values())  # relu and tanh mixed
    # NFN's protocol: order by the split file, keep step 86, test = second half,
    # train/val = the first half shuffled by random.Random(0), cut 80/20
    final = [int(i) for i in order.read_text().split() if rows[int(i)][1] == 86]
    assert [r["model"] for r in ds.rows] == final and len(final) == 24
    trainval = list(range(12))
    random.Random(0).shuffle(trainval)
    want = ["test"] * 24
    for k in trainval[:9]:
        want[k] = "train"
    for k in trainval[9:]:
        want[k] = "val"
    assert [r["split"] for r in ds.rows] == want
    with gzip.open(src / "metrics.csv.gz", "rt") as f:
        metrics = list(csv.DictReader(f))
    images = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 1))
    for i, row in enumerate(ds.rows):
        m = metrics[row["model"]]
        assert row["accuracy"] == float(m["test_accuracy"])
        assert row["activation"] == m["config.activation"] and row["step"] == 86
        assert row["label"] == min(9, int(row["accuracy"] * 10))
        if i % 6 == 0:
            net = small_cnn_zoo_model(row["activation"]).double()
            net.load_state_dict(ds.weights(i))
            with torch.no_grad():
                got = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
            want_out = keras_forward(
                weights[row["model"]].astype(np.float64), row["activation"], images
            )
            np.testing.assert_allclose(got, want_out, rtol=0, atol=1e-12)
    out = tmp_path / "train_out"  # the CLI itself, as a user with the real set runs it
    argv = ["train", "statnn", str(tmp_path / "ds"), "--target", "accuracy", "--epochs", "1"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), "-q"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert -1 <= result["test_kendall_tau"] <= 1 and result["history"][0]["train_loss"] > 0


def test_small_cnn_zoo_one_activation_keeps_its_action(cnn_zoo, tmp_path):
    src, rows, _, _ = cnn_zoo
    import_small_cnn_zoo(src, tmp_path / "ds", activation="tanh", seed=3, progress=False)
    ds = WeightDataset(tmp_path / "ds")
    assert {r["activation"] for r in ds.rows} == {"tanh"} and len(ds) == 8
    assert [g.action for g in ds.space.groups.values()] == ["sign"] * 3
    assert ds.meta["source"]["seed"] == 3 and ds.meta["source"]["order"] is None


def test_small_cnn_zoo_names_the_column_that_does_not_fit(cnn_zoo, tmp_path):
    src, _, _, order = cnn_zoo
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("weights.npy", "metrics.csv.gz"):
        (bad / name).write_bytes((src / name).read_bytes())
    text = (src / "layout.csv").read_text().replace('"(16, 10)"', '"(16, 9)"')
    (bad / "layout.csv").write_text(text)
    with pytest.raises(CheckpointError, match=r"layout.csv, line 9 \(sequential/dense/kernel:0\)"):
        import_small_cnn_zoo(bad, tmp_path / "ds", progress=False)
    (bad / "layout.csv").write_text((src / "layout.csv").read_text())
    (bad / "metrics.csv.gz").unlink()  # the plain metrics.csv some copies of the zoo hold
    with gzip.open(src / "metrics.csv.gz", "rt") as f:
        (bad / "metrics.csv").write_text(f.read())
    (bad / "short_split.csv").write_text("0\n1\n")
    with pytest.raises(CheckpointError, match="not a permutation of the 72 rows"):
        import_small_cnn_zoo(bad, tmp_path / "ds", order=bad / "short_split.csv", progress=False)
    import_small_cnn_zoo(bad, tmp_path / "ds", order=order, step=20, progress=False)
    ds = WeightDataset(tmp_path / "ds")
    assert len(ds) == 24 and {r["step"] for r in ds.rows} == {20}
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 5 \(steps: \[0, 20, 86\]\)"):
        import_small_cnn_zoo(bad, tmp_path / "other", step=5, progress=False)


def test_registry_names_every_importer():
    assert set(IMPORTERS) == {"dwsnets-mnist", "dwsnets-fmnist", "nfn-siren", "small-cnn-zoo"}
    with pytest.raises(ValueError, match="kind must be one of"):
        import_dataset("imagenet", ".", "out")
