"""Bad input at the CLI: exit status 2, one line on stderr naming the file, tensor or
flag, nothing written, and found before any work starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


# --------------------------------------------------------------------------- audit
def test_numbers_out_of_range_are_refused_by_flag(ckpts, tmp_path, capsys):
    """Seeds, sweep and epoch counts, learning rates and activations are checked when
    parsed: a negative seed is not numpy's traceback, ``--max-sweeps 0`` no silent no-op, a
    misspelt activation no silently dropped symmetry."""
    out = tmp_path / "x.safetensors"
    pair = ["align", ckpts["a"], ckpts["b"], "-o", out]
    refused([*pair, "--seed", "-1"], capsys, tmp_path, "--seed", "'-1'", ">= 0")
    refused([*pair, "--max-sweeps", "0"], capsys, tmp_path, "--max-sweeps", "positive")
    refused([*pair, "--ste-epochs", "-3"], capsys, tmp_path, "--ste-epochs", "positive")
    refused([*pair, "--ste-lr", "nan"], capsys, tmp_path, "--ste-lr", "finite")
    refused([*pair, "--ste-lr", "-1"], capsys, tmp_path, "--ste-lr", "positive")
    refused([*pair, "--family", "mlp", "--activation", "rleu"], capsys, tmp_path,
            "--activation", "'rleu'", "unknown", "relu")  # fmt: skip
    m = ["merge", ckpts["a"], ckpts["b"], "-o", out, "--method", "dare_ties", "--seed", "-2"]
    refused(m, capsys, tmp_path, "--seed", ">= 0")


def test_merge_flags_the_method_does_not_read_are_refused(ckpts, tmp_path, capsys):
    """A flag the chosen method (or --config) would drop is refused, never ignored:
    ``--density`` on linear would otherwise merge untrimmed without a word."""
    out = tmp_path / "x.safetensors"
    two = ["merge", ckpts["a"], ckpts["b"], "-o", out]
    cases = [
        (["--method", "linear", "--density", "0.5"], ["--density", "linear"]),
        (["--method", "slerp", "--param", "t=0.5", "--alpha", "0.9"], ["--alpha", "t="]),
        (["--method", "slerp", "--param", "t=0.5", "--scale", "3"], ["--scale", "lambda="]),
        (["--method", "naive", "--align"], ["--align", "naive"]),
        (["--method", "task", "--density", "0.3"], ["--density", "task"]),
        (["--method", "ties", "--alpha", "0.3"], ["--alpha", "ties"]),
        (["--method", "naive", "--param", "t=1"], ["--param", "mergekit"]),
        (["--alpha", "0.3", "--scale", "2"], ["--scale", "align"]),  # the default method
        (["--method", "naive", "--match", "ste"], ["--match", "aligns nothing"]),
        (["--method", "linear", "--match-data", "digits-flat"], ["--match-data", "--align?"]),
    ]
    for flags, needles in cases:
        refused([*two, *flags], capsys, tmp_path, *needles)
    three = ["merge", ckpts["a"], ckpts["b"], ckpts["a"], "-o", out]
    refused([*three, "--method", "naive", "--alpha", "0.2"], capsys, tmp_path, "--alpha", "got 3")
    cfg = tmp_path / "m.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {ckpts['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {ckpts['b']}\n    parameters: {{weight: 1}}\n"
    )
    for flag in (["--weights", "1,9"], ["--param", "normalize=false"], ["--density", "0.5"],
                 ["--alpha", "0.1"], ["--scale", "2"], ["--align"], ["--match", "weight"]):  # fmt: skip
        refused(["merge", "--config", cfg, "-o", out, *flag], capsys, tmp_path, flag[0], "YAML")
    # what each method does read still runs
    assert main([str(a) for a in [*two, "--method", "naive", "--alpha", "0.3", "-q"]]) == 0
    out.unlink()
    argv = [*two, "--method", "dare_ties", "--density", "0.5", "--weights", "1", "-q"]
    assert main([str(a) for a in argv]) == 0


def test_outputs_are_named_for_what_is_written(ckpts, tmp_path, capsys):
    """``-o x.pt`` would hold safetensors bytes metanet cannot read back as a .pt, and a
    ``--plot`` in a format matplotlib lacks would fail after the whole barrier: both
    refused first. An existing plot is replaced only with --force."""
    refused(["create", "mlp", "-o", tmp_path / "cr.pt", "--sizes", "8,4,2"], capsys, tmp_path,
            "cr.pt", "must end in .safetensors")  # fmt: skip
    m = ["merge", ckpts["a"], ckpts["b"], "--method", "naive", "-o", tmp_path / "m.pt"]
    refused(m, capsys, tmp_path, "m.pt", ".safetensors")
    bar = ["barrier", ckpts["a"], ckpts["b"], "--model", MODEL, "--data", "digits-flat", "-q"]
    refused([*bar, "--no-align", "--match", "ste"], capsys, tmp_path, "--match", "--no-align")
    refused([*bar, "--plot", tmp_path / "out.txt"], capsys, tmp_path, "--plot", "out.txt", ".png")
    (tmp_path / "p.png").write_bytes(b"mine")
    refused([*bar, "--plot", tmp_path / "p.png"], capsys, tmp_path, "p.png", "--force")
    if Path("/proc").is_dir():  # a place no one can write, even root: the output is
        # named, not the temporary name it is staged under (either check may catch it)
        m = ["merge", ckpts["a"], ckpts["b"], "--method", "naive", "-q"]
        refused([*m, "-o", "/proc/out.safetensors"], capsys, tmp_path,
                "error: /proc/out.safetensors: cannot be written")  # fmt: skip
        refused([*bar, "--plot", "/proc/x.png"], capsys, tmp_path,
                "error: /proc/x.png: cannot be written")  # fmt: skip


def test_user_functions_and_data_that_fail_are_named(ckpts, tmp_path, capsys):
    """A factory or data function that raises, NaN inputs and class indices past the
    model's outputs: one line naming the flag and batch, before any work."""
    out = tmp_path / "x.safetensors"
    bar = ["barrier", ckpts["a"], ckpts["b"], "--model", MODEL, "-q"]
    refused([*bar, "--data", "tests.cli_models:raises"], capsys, tmp_path,
            "--data tests.cli_models:raises", "RuntimeError", "the user's own bug")  # fmt: skip
    refused([*bar, "--data", "tests.cli_models:bad_targets"], capsys, tmp_path,
            "--data tests.cli_models:bad_targets", "batch 1", "[0, 50]", "10 outputs")  # fmt: skip
    refused([*bar, "--data", "tests.cli_models:nan_data"], capsys, tmp_path,
            "--data tests.cli_models:nan_data", "batch 0", "NaN")  # fmt: skip
    raising = ["barrier", ckpts["a"], ckpts["b"], "--model", "tests.cli_models:raises"]
    refused([*raising, "--data", "digits-flat"], capsys, tmp_path, "--model", "RuntimeError")
    act = ["align", ckpts["a"], ckpts["b"], "-o", out, "--model", MODEL, "--match", "activation"]
    refused([*act, "--match-data", "tests.cli_models:nan_data"], capsys, tmp_path,
            "--match-data", "NaN")  # fmt: skip


def test_nan_weights_are_refused_by_barrier(ckpts, tmp_path, capsys):
    """barrier names a NaN/inf tensor, as align and merge do, with or without alignment
    (it printed a NaN barrier, or scipy's traceback)."""
    w, space = metanet.load(ckpts["b"])
    for bad, what in ((float("nan"), "1 NaN"), (float("inf"), "1 inf")):
        w = {k: v.clone() for k, v in w.items()}
        w["2.weight"][0, 0] = bad
        path = tmp_path / f"bad_{what[2:]}.safetensors"
        metanet.save(path, w, space)
        bar = ["barrier", ckpts["a"], path, "--model", MODEL, "--data", "digits-flat", "-q"]
        for extra in ([], ["--no-align"]):
            refused([*bar, *extra], capsys, tmp_path, path.name, "'2.weight'", what)


def test_empty_and_zero_element_checkpoints(ckpts, tmp_path, capsys):
    """An input with no tensor is refused by name in either position (as the base it
    planned nothing and failed inside the writer); a zero-element tensor is carried
    through by every method (slerp's norms failed on it)."""
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    out = tmp_path / "x.safetensors"
    for order in ((empty, ckpts["a"]), (ckpts["a"], empty)):
        argv = ["merge", *order, "--method", "linear", "-o", out]
        refused(argv, capsys, tmp_path, "empty.safetensors", "has no tensors")
    refused(["align", empty, empty, "--family", "mlp", "-o", out], capsys, tmp_path,
            "empty.safetensors", "has no tensors")  # fmt: skip
    torch.manual_seed(0)
    a = {"w": torch.randn(4, 3), "e": torch.zeros(0, 3)}
    b = {"w": torch.randn(4, 3), "e": torch.zeros(0, 3)}
    save_file(a, tmp_path / "za.safetensors")
    save_file(b, tmp_path / "zb.safetensors")
    for method in ("slerp", "linear", "nuslerp", "karcher", "multislerp"):
        flags = ["--param", "t=0.4"] if method == "slerp" else []
        dest = tmp_path / f"z_{method}.safetensors"
        argv = ["merge", tmp_path / "za.safetensors", tmp_path / "zb.safetensors", "--method",
                method, *flags, "-o", dest, "-q"]  # fmt: skip
        assert main([str(x) for x in argv]) == 0, method
        with safe_open(dest, "pt") as f:
            assert f.get_tensor("e").shape == (0, 3)
            assert f.get_tensor("w").shape == (4, 3)


def test_batchnorm_counters_differ_between_trainings(tmp_path, capsys):
    """Two BatchNorm networks trained for different step counts merge: the step counter
    (num_batches_tracked) is the reference model's; other integer tensors that differ are
    still refused."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    sds = []
    for steps in (100, 250):
        sd = {k: v.clone() + (torch.randn_like(v) if v.is_floating_point() else 0)
              for k, v in net.state_dict().items()}  # fmt: skip
        sd["1.num_batches_tracked"] = torch.tensor(steps)
        sds.append(sd)
    paths = [tmp_path / "bn0.safetensors", tmp_path / "bn1.safetensors"]
    for p, sd in zip(paths, sds):
        save_file(sd, p)
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, paths), "--method", "linear", "-o", str(out), "-q"]) == 0
    with safe_open(out, "pt") as f:
        assert int(f.get_tensor("1.num_batches_tracked")) == 100
        torch.testing.assert_close(
            f.get_tensor("1.running_mean"),
            (sds[0]["1.running_mean"] + sds[1]["1.running_mean"]) / 2,
        )
    sds[1]["step"], sds[0]["step"] = torch.tensor(3), torch.tensor(4)
    for p, sd in zip(paths, sds):
        save_file(sd, p)
    argv = ["merge", *paths, "--method", "linear", "-o", tmp_path / "n.safetensors", "-q"]
    refused(argv, capsys, tmp_path, "'step'", "differs")


# --------------------------------------------------------------------------- audit: datasets
def _npz(path, n: int, labels=None):
    """The first ``n`` digits as uint8 images, with ``labels`` (default their digits)."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images[:n] * 255 / 16).astype(np.uint8)
    np.savez(path, images=images, labels=d.target[:n] if labels is None else np.asarray(labels))
    return path


def _make(tmp_path, name: str, src, *flags) -> list:
    return ["inr", "make", tmp_path / name, "--images", src, "--per-image", "1", "--steps",
            "2", "--width", "4", "--depth", "1", "-q", *flags]  # fmt: skip


def test_inr_make_refuses_what_it_would_write_wrong(tmp_path, capsys):
    """A fit that diverges is named, not written as NaN; an output or --dwsnets that is a
    file, a --dwsnets folder of another dataset (its .pth files would be mixed with ours),
    --num-shards beside a different --shard and a negative --target-psnr are refused
    before anything is written."""
    src = _npz(tmp_path / "four.npz", 4)
    argv = _make(tmp_path, "nan", src, "--num-shards", "1", "--lr", "1e30", "--steps", "20")
    refused(argv, capsys, tmp_path, "have NaN or inf", "lower --lr")
    (tmp_path / "afile").write_text("mine")
    refused(_make(tmp_path, "afile", src), capsys, tmp_path, "afile", "is a file")
    refused(_make(tmp_path, "d", src, "--dwsnets", tmp_path / "afile"), capsys, tmp_path,
            "--dwsnets", "is a file")  # fmt: skip
    refused(_make(tmp_path, "d", src, "--shard", "0/2", "--num-shards", "5"), capsys, tmp_path,
            "--num-shards 5", "--shard 0/2")  # fmt: skip
    refused(_make(tmp_path, "d", src, "--target-psnr", "-5"), capsys, tmp_path, "--target-psnr")
    mnist = _npz(tmp_path / "m.npz", 40)
    dws = ["--resolution", "28", "--dwsnets", tmp_path / "dw", "--num-shards", "1"]
    assert main([str(a) for a in _make(tmp_path, "d4", mnist, *dws)]) == 0
    refused(_make(tmp_path, "d5", mnist, *dws, "--seed", "1"), capsys, tmp_path,
            "--dwsnets", "another dataset's mnist_splits.json")  # fmt: skip
    refused(_make(tmp_path, "d6", mnist, "--resolution", "28", "--dwsnets", tmp_path / "d6"),
            capsys, tmp_path, "--dwsnets", "its own")  # fmt: skip


def test_more_shards_than_networks_reads_back(tmp_path, capsys):
    """Shards past the last INR are empty and read back (they failed as 'unreadable')."""
    src = _npz(tmp_path / "ten.npz", 10)
    assert main([str(a) for a in _make(tmp_path, "ds", src, "--num-shards", "14")]) == 0
    assert main(["inr", "info", str(tmp_path / "ds")]) == 0
    assert "10 INRs" in capsys.readouterr().out


def test_train_refuses_datasets_it_cannot_score(tmp_path, capsys):
    """Labels a classifier cannot hold (-1 of an .npy without labels), an empty
    validation split (it reported accuracy 0) and a single training network are refused
    in one line; more than 10 classes get as many outputs."""
    sets = {
        "unlabelled": _npz(tmp_path / "neg.npz", 20, [-1] * 20),
        "tiny": _npz(tmp_path / "three.npz", 3),
        "many": _npz(tmp_path / "many.npz", 30, list(range(15)) * 2),
    }
    for name, src in sets.items():
        assert main([str(a) for a in _make(tmp_path, name, src, "--num-shards", "1")]) == 0
    run = ["train", "statnn", "--epochs", "1", "--batch-size", "2", "-q", "--out"]
    refused([*run, tmp_path / "r1", tmp_path / "unlabelled"], capsys, tmp_path,
            "20 networks have label -1")  # fmt: skip
    refused([*run, tmp_path / "r2", tmp_path / "tiny"], capsys, tmp_path,
            "validation split is empty")  # fmt: skip
    assert main([str(a) for a in [*run, tmp_path / "r3", tmp_path / "many"]]) == 0
    assert (tmp_path / "r3" / "result.json").exists()


def test_train_flags_out_of_range_and_dataset_kinds(datasets, tmp_path, capsys):
    """Negative --probes / --frequencies, and probes or coordinate augmentation on a zoo,
    are one line (they were tracebacks)."""
    zoo, inrs = datasets
    run = ["train", "statnn", "--epochs", "1", "-q", "--out", tmp_path / "r"]
    refused([*run, inrs, "--probes", "-3"], capsys, tmp_path, "--probes", ">= 0")
    refused([*run, inrs, "--frequencies", "-2"], capsys, tmp_path, "--frequencies", ">= 0")
    z = [*run, zoo, "--target", "accuracy"]
    refused([*z, "--probes", "4"], capsys, tmp_path, "not an INR dataset")
    refused([*z, "--augment-coords", "rotate=10"], capsys, tmp_path, "not an INR dataset")


def test_inputs_and_flags_the_dataset_commands_would_misread(datasets, tmp_path, capsys):
    """Make-only flags given to inr info, --frequencies to a model without an encoding, a
    resolution past the cap, an empty class folder (an output no INR trains), and a
    folder of someone's files as the dataset folder: refused, not dropped or mixed in."""
    zoo, inrs = datasets
    refused(["inr", "info", inrs, "--steps", "3"], capsys, tmp_path, "--steps", "inr info")
    run = ["train", "statnn", inrs, "--epochs", "1", "-q", "--out", tmp_path / "r"]
    refused([*run, "--frequencies", "3"], capsys, tmp_path, "--frequencies", "statnn")
    src = _npz(tmp_path / "four.npz", 4)
    refused(_make(tmp_path, "d", src, "--resolution", "100000"), capsys, tmp_path,
            "--resolution 100000")  # fmt: skip
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a" / "0.png")
    refused(_make(tmp_path, "d", tmp_path / "imgs"), capsys, tmp_path,
            "imgs/b: a class folder with no images")  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused(_make(tmp_path, "mine", src), capsys, tmp_path, "'notes.txt'", "no dataset.json")
    refused(["zoo", "make", mine, "--n", "2", "-q"], capsys, tmp_path, "'notes.txt'")
    imp = ["datasets", "import", "dwsnets-mnist", mine, tmp_path / "o"]
    refused([*imp, "--splits", "s.json", "--val-size", "5"], capsys, tmp_path, "--val-size",
            "--splits")  # fmt: skip
    imp = ["datasets", "import", "nfn-siren", mine, tmp_path / "o"]
    refused([*imp, "--augmentations", "-2"], capsys, tmp_path, "--augmentations", ">= 0")


def test_factories_and_files_that_are_not_what_they_seem(tmp_path, capsys, monkeypatch):
    """A factory returning three things, an example input too large to allocate, a file
    that is no checkpoint, and a folder in the current directory named like a module
    torch looks for (it shadowed it while tracing)."""
    (tmp_path / "fac.py").write_text(
        "import torch\n"
        "def tup3():\n    return torch.nn.Linear(8, 2), torch.randn(2, 8), 5\n"
        "def pair():\n    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(),"
        " torch.nn.Linear(4, 2)), torch.randn(2, 8)\n"
    )
    monkeypatch.chdir(tmp_path)
    refused(["inspect", "fac:tup3"], capsys, tmp_path, "fac:tup3", "a tuple of 3")
    refused(["inspect", "fac:pair", "--input-shape", "100000000000,8"], capsys, tmp_path,
            "--input-shape", "800,000,000,000 values")  # fmt: skip
    (tmp_path / "notes.txt").write_text("mine")
    refused(["inspect", "notes.txt"], capsys, tmp_path, "notes.txt: not a checkpoint")
    (tmp_path / "z3").mkdir()  # torch's export probes `import z3`
    import sys

    before = list(sys.path)
    assert main(["inspect", "fac:pair"]) == 0
    assert sys.path == before  # the current folder was importable only for the factory
