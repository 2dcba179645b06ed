"""Bad input at the CLI: exit status 2, one line on stderr naming the file, tensor or
flag, nothing written, and found before any work starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import metanet
from converters import from_module
from metanet.cli import build_parser, main
from metanet.io import SPACE_KEY
from tasks.datasets import digits
from tests.helpers import refused

MODEL = "tests.cli_models:digits_mlp"  # a 64-64-64-10 MLP, example input (4, 64)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Untrained digit MLPs saved with their spaces: two of width 64, one of width 32."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, width, seed in (("a", 64, 0), ("b", 64, 1), ("narrow", 32, 2)):
        torch.manual_seed(seed)
        model = digits.mlp(width, 2)
        paths[name] = root / f"{name}.safetensors"
        metanet.save(paths[name], model.state_dict(), from_module(model, torch.randn(2, 64)))
    return paths


def test_existing_output_folder_is_refused_before_alignment(ckpts, tmp_path, capsys):
    """``-o EXISTING_DIR --force``: refused at once (no matching progress, no summary on
    stderr: the one line is the error), the folder untouched."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["align", ckpts["a"], ckpts["b"], "-o", out, "--force"]
    refused(argv, capsys, tmp_path, out, "is a folder")
    argv = ["align", ckpts["a"], ckpts["b"], "-o", out / "keep.txt"]
    refused(argv, capsys, tmp_path, "keep.txt", "exists", "--force")


def test_model_that_does_not_fit_the_checkpoint(ckpts, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    argv = ["align", ckpts["narrow"], ckpts["narrow"], "-o", out, "--model", MODEL]
    refused(argv, capsys, tmp_path, f"--model {MODEL}", "'0.weight'", "(64, 64)", "(32, 64)")


def test_model_that_does_not_run_on_the_input_shape(ckpts, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    argv = ["align", ckpts["a"], ckpts["b"], "-o", out, "--model", MODEL, "--input-shape", "8,32"]
    refused(argv, capsys, tmp_path, "--input-shape 8,32", "does not run", "(8, 32)")


def test_data_the_model_cannot_read(ckpts, tmp_path, capsys):
    """digits (8×8 images) for an MLP on flat inputs: named before any interpolation."""
    argv = ["barrier", ckpts["a"], ckpts["b"], "--model", MODEL, "--data", "digits", "-q"]
    refused(argv, capsys, tmp_path, "--data digits", "(256, 1, 8, 8)")


def test_flags_checked_before_loading(ckpts, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    refused(
        ["merge", ckpts["a"], ckpts["b"], ckpts["a"], "-o", out, "--method", "align"],
        capsys,
        tmp_path,
        "--method align",
        "got 3",
    )
    refused(["barrier", ckpts["a"], ckpts["b"], "--model", MODEL], capsys, tmp_path, "--data")
    argv = ["barrier", ckpts["a"], ckpts["b"], "--model", MODEL, "--data", "digits-flat"]
    refused([*argv, "--alphas", "1"], capsys, tmp_path, "--alphas 1")
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, also exit 2
        main(["inspect", "x:y", "--input-shape", "8,x"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda d, g: d["groups"][g].update(size="abc"), ["size must be an integer", "'abc'"]),
        (lambda d, g: d["groups"][g].update(size=128.7), ["size must be an integer", "128.7"]),
        (lambda d, g: d.update(groups=list(d["groups"])), ["groups must be an object"]),
        (
            lambda d, g: d["tensors"]["0.weight"].update(shape=[64, "64"]),
            ["tensors['0.weight'].shape[1] must be an integer"],
        ),
        (
            lambda d, g: d["tensors"]["0.weight"]["axes"][0][0].__setitem__(0, ["h", -3]),
            ["axes[0][0][0][1] must be a size"],
        ),
    ],
)
def test_weight_space_metadata_of_the_wrong_type(ckpts, tmp_path, capsys, edit, needles):
    """A hand-edited WeightSpace in a checkpoint's metadata: the file and the field named."""
    with safe_open(str(ckpts["a"]), framework="pt") as f:
        doc = json.loads(f.metadata()[SPACE_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(doc, next(iter(doc["groups"])))
    bad = tmp_path / "edited.safetensors"
    save_file(tensors, str(bad), metadata={SPACE_KEY: json.dumps(doc)})
    refused(["inspect", bad], capsys, tmp_path, "edited.safetensors", "WeightSpace", *needles)
    with pytest.raises(metanet.WeightSpaceError, match=needles[0].replace("[", r"\[")):
        metanet.WeightSpace.from_json(json.dumps(doc))


def test_missing_path_and_unimportable_factory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(["inspect", "does/not/exist"], capsys, tmp_path, "does/not/exist", "no such file")
    refused(["inspect", "nomodule:build"], capsys, tmp_path, "nomodule", "cannot import")
    refused(
        ["inspect", "tasks.datasets.digits:nothing"], capsys, tmp_path, "no attribute 'nothing'"
    )
    refused(["graph", "tasks.datasets.digits:mlp"], capsys, tmp_path, "--input-shape")


class Boom:
    """Unpickling this would create a file (and could do anything else)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unreadable_pt_files(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    refused(["inspect", empty, "--family", "mlp"], capsys, tmp_path, "empty.pt", "is empty")
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(2, 2), "x": Boom(str(marker))}, evil)
    line = refused(["inspect", evil, "--family", "mlp"], capsys, tmp_path, "evil.pt", "refused")
    assert "weights_only=False" not in line and "open" in line and not marker.exists()
    good = tmp_path / "good.pt"
    torch.save(digits.mlp(8, 1).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    refused(["inspect", truncated, "--family", "mlp"], capsys, tmp_path, "truncated or corrupt")
    refused(["inspect", good], capsys, tmp_path, "good.pt", "--family")


def test_pt_given_to_load_pretrained(tmp_path):
    from converters import load_pretrained

    path = tmp_path / "plain.pt"
    torch.save(digits.mlp(8, 1).state_dict(), path)
    with pytest.raises(metanet.CheckpointError, match="PyTorch pickle") as e:
        load_pretrained(path)
    assert "safetensors file (truncated" not in str(e.value)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A tiny CNN zoo (24 networks, 5 steps each) and a tiny INR dataset."""
    from tasks.datasets.inr import INRConfig, make_dataset
    from tasks.datasets.zoo import make_zoo

    zoo = tmp_path_factory.mktemp("zoo")
    make_zoo(zoo, 24, max_steps=5, num_shards=1, progress=False)
    inrs = tmp_path_factory.mktemp("inrs")
    cfg = INRConfig(hidden=8, depth=1, steps=5)
    make_dataset(inrs, per_image=1, cfg=cfg, num_shards=1, progress=False)
    return zoo, inrs


def test_inr_info_on_a_zoo(datasets, capsys):
    zoo, inrs = datasets
    refused(["inr", "info", zoo], capsys, zoo, "not an INR dataset", "'psnr'", "zoo")
    assert main(["inr", "info", str(inrs)]) == 0
    assert "1,797 INRs" in capsys.readouterr().out


def test_train_without_the_target(datasets, tmp_path, capsys):
    """A zoo without --target, a target the dataset lacks, and a batch larger than the
    training split: each refused before training, no --out folder made."""
    zoo, inrs = datasets
    out = tmp_path / "run"
    refused(["train", "statnn", zoo, "--out", out], capsys, tmp_path, "--target accuracy")
    argv = ["train", "statnn", inrs, "--out", out, "--target", "accuracy", "-q"]
    refused(argv, capsys, tmp_path, "'accuracy'", "--target accuracy", str(inrs))
    argv = ["train", "statnn", zoo, "--out", out, "--target", "accuracy", "-q"]
    refused(argv, capsys, tmp_path, "fewer than batch_size=64", "--batch-size")
    assert not out.exists()


def test_train_writes_valid_json_and_a_line_per_epoch(datasets, tmp_path, capsys):
    """No test accuracy for a regression run: ``null`` in result.json, not NaN."""
    zoo, _ = datasets
    out = tmp_path / "run"
    argv = ["train", "statnn", str(zoo), "--out", str(out), "--target", "accuracy"]
    assert main([*argv, "--epochs", "3", "--batch-size", "4"]) == 0
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("epoch ")]
    assert [s.split()[1] for s in lines] == ["1/3", "2/3", "3/3"]
    assert all("train loss" in s and "val kendall tau" in s for s in lines)
    text = (out / "result.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in result.json"))
    assert result["test_accuracy"] is None and result["val_accuracy"] is None
    for row in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(row, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_curves_have_labelled_axes_and_a_legend_clear_of_the_title():
    from tasks.learn.train import TrainResult, _plot_curves

    history = [
        {"epoch": e, "train_loss": 2.0 / e, "val_accuracy": 0.1 * e, "seconds": e}
        for e in (1, 2, 3)
    ]
    result = TrainResult(
        kind="unf", epochs=3, test_accuracy=0.3, val_accuracy=0.3, seconds=3.0, world_size=1
    )
    result.history = history
    fig = _plot_curves(result)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    loss_ax, metric_ax = fig.axes
    assert loss_ax.get_ylabel() and metric_ax.get_ylabel() and loss_ax.get_xlabel() == "epoch"
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(loss_ax.title.get_window_extent(renderer))
    assert not box.overlaps(loss_ax.get_window_extent(renderer))  # below the plotting area
    assert {t.get_text() for t in legend.get_texts()} == {"train loss", "val accuracy"}


def _help_texts() -> dict[str, str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    texts = {"": parser.format_help(), **{k: p.format_help() for k, p in sub.choices.items()}}
    return {k: " ".join(v.split()) for k, v in texts.items()}


def test_every_flag_has_help_and_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"metanet {name} {action.option_strings or action.dest}: no help"
    texts = _help_texts()
    for text in texts.values():
        assert "``" not in text and ":class:" not in text  # no RST in --help
    assert "(default: 100)" in texts["align"]  # --max-sweeps
    assert "(default: train_out)" in texts["train"] and "(default: 64)" in texts["train"]
    assert "module:factory" in texts["inspect"] and "Hugging Face" in texts["inspect"]
    assert "nfn-np: the nfn package" in texts["train"]


def test_inr_help_states_the_recipe_defaults():
    """The inr flags read their defaults from INRConfig; the help text must say the same."""
    from tasks.datasets.inr import INRConfig

    text = _help_texts()["inr"]
    cfg = INRConfig()
    for flag, value in (
        ("width", cfg.hidden),
        ("depth", cfg.depth),
        ("steps", cfg.steps),
        ("lr", cfg.lr),
        ("w0", cfg.w0),
        ("variant", cfg.variant),
        ("target-psnr", cfg.target_psnr),
    ):
        assert f"(default {value})" in text.rsplit(f"--{flag} ", 1)[1][:200], flag


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"metanet {metanet.__version__}"


def test_lazy_package_keeps_every_public_name():
    import metanet as m

    assert set(m.__all__) == set(m._EXPORTS)
    for name in m.__all__:
        assert getattr(m, name) is getattr(__import__(m._EXPORTS[name], fromlist=[name]), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        m.no_such_name  # noqa: B018


def _console(args, cwd, **kw):
    script = shutil.which("metanet")
    if script is None:
        pytest.skip("console script not installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)


def test_console_script_imports_factories_from_the_current_folder(tmp_path):
    """``mymodel:build`` next to the user, from the installed console script (no
    PYTHONPATH)."""
    (tmp_path / "mymodel.py").write_text(
        "import torch\n\n\ndef build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), "
        "torch.nn.Linear(6, 2))\n"
    )
    res = _console(["inspect", "mymodel:build", "--input-shape", "3,4", "-q"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "sign" in res.stdout and "6" in res.stdout


def test_help_starts_without_torch(tmp_path):
    """``metanet --help`` imports neither torch nor torch_geometric (what made it slow)."""
    code = "import sys; from metanet.cli import build_parser; build_parser().format_help(); "
    code += "print(sorted({'torch', 'torch_geometric'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    start = time.perf_counter()
    res = _console(["--help"], tmp_path, check=True)
    assert "align" in res.stdout
    assert time.perf_counter() - start < 10  # loose: a loaded CI box; the benchmark measures


def test_datasets_import_kinds_and_options(tmp_path, capsys):
    """The CLI offers exactly the importers tasks.datasets.field has; a missing release or
    an option the importer does not take is named before anything is read."""
    from metanet.cli import DATASET_KINDS
    from tasks.datasets.field import IMPORTERS

    assert set(DATASET_KINDS) == set(IMPORTERS)
    dst = tmp_path / "out"
    refused(["datasets", "import", "nfn-siren", tmp_path / "nope", dst], capsys, tmp_path, "nope")
    argv = ["datasets", "import", "nfn-siren", tmp_path, dst, "--order", "x.csv"]
    refused(argv, capsys, tmp_path, "--order", "nfn-siren")


@pytest.mark.requires("transformers")
def test_quiet_silences_transformers_bars(capfd):
    """Reading a Hugging Face folder draws transformers' weight-loading bar; -q hides it
    (and leaves the bar switched on afterwards for the rest of the process)."""
    from tests.fixtures.architectures import minilm_dir

    folder = str(minilm_dir())
    assert main(["inspect", folder]) == 0
    assert "Loading weights" in capfd.readouterr().err
    assert main(["inspect", folder, "-q"]) == 0
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "%|" not in captured.err
    assert "WeightSpace" in captured.out
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()


def test_train_scalegmn_on_a_relu_zoo(datasets, tmp_path, capsys):
    """``metanet train scalegmn``: the CNN zoo's ReLU channels scale positively; the model
    regresses accuracy on them, and its inputs were standardized by scale only."""
    zoo, _ = datasets
    out = tmp_path / "run"
    argv = ["train", "scalegmn", str(zoo), "--out", str(out), "--target", "accuracy"]
    assert main([*argv, "--epochs", "1", "--batch-size", "4", "-q"]) == 0
    assert json.loads((out / "result.json").read_text())["kind"] == "scalegmn"
