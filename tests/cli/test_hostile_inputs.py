"""Nothing lost, nothing leaked: NaN/inf merge parameters and hostile Hugging Face folders.

Every refusal: exit 2, one line naming the flag, parameter, tensor or file at fault,
nothing written, every input byte for byte as it was (sha256).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metanet
from converters import from_state_dict
from metanet.cli import main
from metanet.io import CheckpointError
from metanet.shards import INDEX, read_index
from tasks.checkpoints.stream import NonFiniteError, copy_folder
from tests.helpers import refused


def _mlp(path: Path, seed: int, fill: float | None = None) -> Path:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    sd = model.state_dict()
    if fill is not None:
        sd = {k: torch.full_like(v, fill) for k, v in sd.items()}
    metanet.save(path, sd, from_state_dict(sd, "mlp"))
    return path


@pytest.fixture
def pair(tmp_path):
    return _mlp(tmp_path / "a.safetensors", 0), _mlp(tmp_path / "b.safetensors", 1)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--alpha", "nan"], ["--alpha", "finite"]),
        (["--alpha", "inf"], ["--alpha", "finite"]),
        (["--method", "task", "--scale", "inf"], ["--scale", "finite"]),
        (["--method", "ties", "--scale=-inf"], ["--scale", "finite"]),
        (["--method", "ties", "--density", "nan"], ["--density", "finite"]),
        (["--method", "ties", "--density=-1"], ["--density", "(0, 1]"]),
        (["--method", "ties", "--density", "2"], ["--density", "(0, 1]"]),
        (["--method", "linear", "--weights", "nan,1"], ["--weights", "finite"]),
        (["--method", "linear", "--weights", "1,inf"], ["--weights", "finite"]),
        (["--method", "linear", "--weights", "1,-1"], ["sum to zero"]),
        (["--method", "slerp", "--param", "t=nan"], ["'t'", "finite"]),
        (["--method", "slerp", "--param", "t=abc"], ["'t'", "number", "abc"]),
        (["--method", "della", "--param", "lambda=big"], ["'lambda'", "number"]),
        (["--method", "della", "--param", "normalize=sometimes"], ["'normalize'", "true or false"]),
        (["--method", "della", "--param", "int8_mask=maybe"], ["'int8_mask'", "true or false"]),
    ],
)
def test_bad_merge_flags_refused_before_work(pair, tmp_path, capsys, flags, needles):
    """NaN/inf, out-of-range and mistyped merge parameters: nothing written (an all-NaN
    checkpoint with exit 0 before)."""
    a, b = pair
    out = tmp_path / "m.safetensors"
    refused(["merge", a, b, "-o", out, "-q", *flags], capsys, tmp_path, *needles)


@pytest.mark.parametrize(
    ("yaml_params", "needles"),
    [
        ("weight: .nan", ["'weight'", "finite"]),
        ("weight: -.inf", ["'weight'", "finite"]),
        ('weight: "abc"', ["'weight'", "number", "abc"]),
        ("density: 2.0", ["'density'", "(0, 1]", "2"]),
        ("density: -0.5", ["'density'", "(0, 1]"]),
        ("density: [{filter: '0.', value: .nan}, {value: 0.5}]", ["'density'", "finite"]),
    ],
)
def test_bad_config_values_refused(pair, tmp_path, capsys, yaml_params, needles):
    a, b = pair
    config = tmp_path / "merge.yml"
    config.write_text(
        "merge_method: ties\n"
        f"base_model: {a}\n"
        "models:\n"
        f"  - model: {b}\n"
        f"    parameters: {{{yaml_params}}}\n"
    )
    out = tmp_path / "m.safetensors"
    refused(["merge", "--config", config, "-o", out, "-q"], capsys, tmp_path, *needles)


@pytest.mark.parametrize(
    "params",
    [
        "{normalize: sometimes}",
        "{int8_mask: maybe}",
        "{lambda: big}",
    ],
)
def test_bad_global_config_values_refused(pair, tmp_path, capsys, params):
    a, b = pair
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\nparameters: {params}\n"
    )
    key = params.strip("{}").split(":")[0]
    out = tmp_path / "m.safetensors"
    refused(["merge", "--config", config, "-o", out, "-q"], capsys, tmp_path, f"'{key}'")


@pytest.mark.parametrize("streaming", [True, False])
def test_merge_that_overflows_writes_nothing(tmp_path, capsys, streaming):
    """Finite inputs and parameters whose merge overflows float32: the writer refuses the
    output tensor by name, on the streaming path and the in-memory one."""
    if streaming:
        a = _mlp(tmp_path / "a.safetensors", 0, fill=2e38)
        b = _mlp(tmp_path / "b.safetensors", 1, fill=2e38)
    else:  # plain state dicts (--family) are merged in memory
        for name, seed in (("a", 0), ("b", 1)):
            torch.manual_seed(seed)
            lin = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
            torch.save(
                {k: torch.full_like(v, 2e38) for k, v in lin.state_dict().items()},
                tmp_path / f"{name}.pt",
            )
        a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    out = tmp_path / "m.safetensors"
    argv = ["merge", a, b, "--method", "linear", "--param", "normalize=false", "-o", out, "-q"]
    if not streaming:
        argv += ["--family", "mlp"]
    refused(argv, capsys, tmp_path, "the output", "tensor", "inf", "nothing written")


@pytest.mark.requires("transformers")
def test_write_output_refuses_non_finite_tensors(pair, tmp_path):
    from tasks.checkpoints import open_checkpoint
    from tasks.checkpoints.writer import write_checkpoint

    ck = open_checkpoint(pair[0])
    out = tmp_path / "out.safetensors"

    def tensor(name):
        t = ck.weights[name].clone()
        return t.fill_(float("nan")) if name == "2.weight" else t

    with pytest.raises(NonFiniteError, match="'2.weight'"):
        write_checkpoint(ck, out, tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# --------------------------------------------------------------------------- folders
def _hf_pair(root: Path) -> tuple[Path, Path]:
    """Two tiny Llama folders (different seeds) with a tokenizer config and a subfolder."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    folders = []
    for seed, name in ((0, "A"), (1, "B")):
        torch.manual_seed(seed)
        folder = root / name
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
        (folder / "tokenizer_config.json").write_text('{"model_max_length": 16}\n')
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
        folders.append(folder)
    return folders[0], folders[1]


SECRET = "hf_SECRET_TOKEN_0123456789"


def _no_secret_anywhere(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != "secret.txt":
            assert SECRET.encode() not in p.read_bytes(), p


@pytest.fixture
def hf_pair(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    secret = home / "secret.txt"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    work = tmp_path / "work"
    work.mkdir()
    a, b = _hf_pair(work)
    return a, b, secret, work


@pytest.mark.parametrize("command", ["align", "merge", "mergemany"])
def test_symlinked_secret_never_reaches_the_output(hf_pair, tmp_path, capsys, command):
    """``tokenizer_config.json`` linked to a private file outside the folder: refused,
    naming the link, on the streaming paths (align, merge) and the in-memory one
    (mergemany); the secret is nowhere in what was written."""
    a, b, secret, work = hf_pair
    for folder in (a, b):
        (folder / "tokenizer_config.json").unlink()
        (folder / "tokenizer_config.json").symlink_to(secret)
    out = work / "out"
    argv = {
        "align": ["align", a, b, "-o", out],
        "merge": ["merge", a, b, "--method", "linear", "-o", out],
        "mergemany": ["merge", a, b, "--method", "mergemany", "-o", out],
    }[command]
    refused([*argv, "-q"], capsys, tmp_path, "tokenizer_config.json", "outside", str(secret))
    assert not out.exists()
    _no_secret_anywhere(tmp_path)


def test_symlinked_system_folder_and_loops_refused_at_once(hf_pair, tmp_path, capsys):
    a, b, _, work = hf_pair
    outside = tmp_path / "system"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "passwd").write_text("root:x:0:0\n")
    for folder in (a, b):
        os.rename(folder / "1_Pooling", folder / "pooling_real")
        (folder / "1_Pooling").symlink_to(outside, target_is_directory=True)
    out = work / "out"
    refused(["align", a, b, "-o", out, "-q"], capsys, tmp_path, "1_Pooling", "outside")
    # a loop: refused at once, before the weights are copied over and over
    for folder in (a, b):
        (folder / "1_Pooling").unlink()
        (folder / "loop1").symlink_to(folder / "loop2")
        (folder / "loop2").symlink_to(folder / "loop1")
    start = time.perf_counter()
    refused(["merge", a, b, "--method", "linear", "-o", out, "-q"], capsys, tmp_path, "loop")
    assert time.perf_counter() - start < 30
    assert not out.exists()


def test_links_inside_the_folder_are_copied_as_links(hf_pair, tmp_path, capsys):
    """A link that stays inside its folder is kept as a link, pointing inside the output."""
    a, b, _, work = hf_pair
    for folder in (a, b):
        (folder / "extra").mkdir()
        (folder / "extra" / "vocab.txt").write_text("hello\n")
        (folder / "vocab.txt").symlink_to(Path("extra") / "vocab.txt")
        (folder / "abs_vocab.txt").symlink_to(folder / "extra" / "vocab.txt")
    out = work / "out"
    assert main(["merge", str(a), str(b), "--method", "linear", "-o", str(out), "-q"]) == 0
    for name in ("vocab.txt", "abs_vocab.txt"):
        link = out / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert os.path.realpath(link) == os.path.realpath(out / "extra" / "vocab.txt")
        assert link.read_text() == "hello\n"


def test_hf_cache_snapshot_files_are_copied_as_files(tmp_path):
    """A Hugging Face cache snapshot links every file into its repo's ``blobs``: those
    are copied as files; a link out of the repo is still refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text('{"model_max_length": 16}\n')
    (snap / "tokenizer_config.json").symlink_to(Path("..", "..", "blobs", "f00d"))
    copy_folder(snap, tmp_path / "out")
    copied = tmp_path / "out" / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_text() == '{"model_max_length": 16}\n'
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    (snap / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the input folder"):
        copy_folder(snap, tmp_path / "out2")


@pytest.mark.parametrize(
    "entry", ["../other/model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."]
)
def test_escaping_index_entry_refused(hf_pair, tmp_path, capsys, entry):
    a, b, _, work = hf_pair
    import json

    for folder in (a, b):
        (folder / INDEX).write_text(
            json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": entry}})
        )
    with pytest.raises(CheckpointError, match="stay inside their folder"):
        read_index(a)
    out = work / "out"
    refused(["merge", a, b, "--method", "linear", "-o", out, "-q"], capsys, tmp_path, INDEX)
    refused(["align", a, b, "-o", out, "-q"], capsys, tmp_path, INDEX, repr(entry))


def test_index_naming_a_tensor_its_shard_lacks_is_refused(hf_pair, tmp_path, capsys):
    """A stale index (a shard replaced, an entry edited) names a tensor the shard does not
    hold: refused by name, not silently dropped from the merge."""
    a, b, _, work = hf_pair
    import json

    from safetensors import safe_open

    with safe_open(a / "model.safetensors", "pt") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    weight_map["ghost.weight"] = "model.safetensors"
    (a / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = work / "out"
    refused(["merge", a, b, "--method", "linear", "-o", out, "-q"], capsys, tmp_path,
            INDEX, "'ghost.weight'", "does not hold it")  # fmt: skip


@pytest.mark.requires("transformers")
def test_heads_layout_mismatch_is_refused_not_falsely_verified(tmp_path, capsys):
    """A 4×16-head and an 8×8-head Llama have tensors of equal shapes: aligning B in A's
    head layout was "verified" on A's model before. Now every path that aligns refuses,
    naming the config field; a merge that aligns nothing still runs (elementwise)."""
    import transformers

    folders = []
    for heads, name in ((4, "A"), (8, "B")):
        cfg = transformers.LlamaConfig(
            vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16,
        )  # fmt: skip
        torch.manual_seed(heads)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    a, b = folders
    out = tmp_path / "out"
    refused(["align", a, b, "-o", out, "-q"], capsys, tmp_path, "num_attention_heads=8", "4")
    cfg = tmp_path / "m.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n    align: weight\n"
    )
    refused(["merge", "--config", cfg, "-o", out, "-q"], capsys, tmp_path, "num_attention_heads")
    assert main(["merge", str(a), str(b), "--method", "linear", "-o", str(out), "-q"]) == 0


@pytest.mark.parametrize("command", ["align", "merge", "inr"])
def test_device_cuda_without_cuda_is_refused_before_work(
    pair, tmp_path, capsys, command, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    a, b = pair
    argv = {
        "align": ["align", a, b, "-o", tmp_path / "o.safetensors"],
        "merge": ["merge", a, b, "--method", "linear", "-o", tmp_path / "o.safetensors"],
        "inr": ["inr", "make", tmp_path / "inrs"],
    }[command]
    refused([*argv, "--device", "cuda", "-q"], capsys, tmp_path, "--device cuda", "no CUDA")
    assert not (tmp_path / "inrs").exists()


# --------------------------------------------------------------------------- crafted headers

_TENSORS = {
    "a": torch.arange(6, dtype=torch.float32).view(2, 3),
    "b": torch.ones(4, dtype=torch.int64),
}


def _crafted(tmp_path: Path, header: dict, data: bytes) -> Path:
    import json
    import struct

    blob = json.dumps(header).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


_DATA = _TENSORS["a"].numpy().tobytes() + _TENSORS["b"].numpy().tobytes()
_VALID = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
}
_ints = st.integers(min_value=-2, max_value=80)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "I64", "F16", "BF16", "U16", "F8_E4M3", "X", 3]),
        "shape": st.one_of(st.lists(_ints, max_size=3), st.just("2x3")),
        "data_offsets": st.one_of(st.lists(_ints, min_size=0, max_size=3), st.just(None)),
    }
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.dictionaries(st.sampled_from(["a", "b", "c"]), _entry, max_size=3),
    cut=st.integers(min_value=-8, max_value=8),
    keep_valid=st.booleans(),
)
def test_crafted_headers_load_as_safetensors_does_or_fail_with_checkpoint_error(
    tmp_path, edits, cut, keep_valid
):
    """Offsets short, overlapping, missing or past the end, unknown dtypes, wrong shapes,
    trailing bytes: the streaming reader either reads exactly what safetensors reads, or
    raises CheckpointError; never another exception, never a read past the file."""
    from safetensors import safe_open

    from metanet.shards import LazyWeights

    header = dict(_VALID) if keep_valid else {}
    header.update(edits)
    data = _DATA[: len(_DATA) + cut] if cut < 0 else _DATA + b"\0" * cut
    path = _crafted(tmp_path, header, data)
    try:
        lazy = LazyWeights(path)
        ours = {k: lazy.read(k) for k in lazy.entries}
    except CheckpointError:
        return
    assert sum(t.numel() * t.element_size() for t in ours.values()) <= path.stat().st_size
    with safe_open(str(path), framework="pt") as f:  # it must accept what we accepted
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_overlapping_offsets_are_refused(tmp_path):
    """``b`` pointing into ``a``'s bytes: safetensors refuses it, and so do we (before, b
    read a's bytes)."""
    from metanet.shards import LazyWeights

    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
    }
    with pytest.raises(CheckpointError, match="overlaps"):
        LazyWeights(_crafted(tmp_path, header, _DATA[:24]))


def test_hostile_embedded_weight_space_is_bounded(pair, tmp_path, capsys):
    """An unused group of size 1e15, a neuron set larger than the model, JSON nested 100k
    deep: refused when read (one line at the CLI), before any allocation."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from metanet.io import SPACE_KEY
    from metanet.space import WeightSpace, WeightSpaceError

    a, _ = pair
    with safe_open(str(a), framework="pt") as f:
        doc = json.loads(f.metadata()[SPACE_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    group = next(iter(doc["groups"]))
    huge = json.loads(json.dumps(doc))
    huge["groups"]["unused"] = dict(doc["groups"][group], size=10**15)
    with pytest.raises(WeightSpaceError, match="acts on no tensor"):
        WeightSpace.from_json(json.dumps(huge))
    small = json.loads(json.dumps(doc))  # an unused group no larger than the model: harmless
    small["groups"]["unused"] = dict(doc["groups"][group], size=3)
    WeightSpace.from_json(json.dumps(small))
    bad = tmp_path / "hostile.safetensors"
    save_file(tensors, str(bad), metadata={SPACE_KEY: json.dumps(huge)})
    refused(["inspect", bad], capsys, tmp_path, "hostile.safetensors", "'unused'", "no tensor")
    refused(["align", bad, a, "-o", tmp_path / "o.safetensors", "-q"], capsys, tmp_path, "'unused'")
    with pytest.raises(WeightSpaceError, match="nested too deeply"):
        WeightSpace.from_json("[" * 100_000 + "]" * 100_000)


def test_train_output_inside_its_dataset_is_refused(tmp_path, capsys):
    dataset = tmp_path / "inrs"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}\n")
    for out in (dataset, dataset / "model"):
        refused(["train", "unf", dataset, "--out", out, "-q"], capsys, tmp_path, "inside")


def test_cache_whose_blobs_is_a_link_is_not_trusted(tmp_path):
    """A "cache" whose ``blobs`` folder links to the home folder: its snapshot's links are
    links out of the input, refused like any other."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text(SECRET)
    repo = tmp_path / "hub" / "models--org--evil"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").symlink_to(home, target_is_directory=True)
    (snap / "tokenizer.json").symlink_to(Path("..", "..", "blobs", "secret.txt"))
    with pytest.raises(CheckpointError, match="outside the input folder"):
        copy_folder(snap, tmp_path / "out")
    _no_secret_anywhere(tmp_path)


def test_tokenizer_source_is_copied_by_the_same_rules(hf_pair, tmp_path, capsys):
    a, b, secret, work = hf_pair
    tok = work / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").symlink_to(secret)
    out = work / "out"
    cfg = work / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   f"tokenizer_source: {tok}\n")  # fmt: skip
    refused(
        ["merge", "--config", cfg, "-o", out, "-q"], capsys, tmp_path, "tokenizer.json", "outside"
    )
    (tok / "tokenizer.json").unlink()
    refused(["merge", "--config", cfg, "-o", out, "-q"], capsys, tmp_path, "no tokenizer files")
    _no_secret_anywhere(tmp_path)


def test_output_that_holds_an_input_is_refused_even_with_force(hf_pair, tmp_path, capsys):
    """``-o`` a folder that contains the inputs: with --force the old output (inputs and
    all) would have been moved aside and deleted."""
    a, b, _, work = hf_pair
    refused(["merge", a, b, "--method", "linear", "-o", work, "--force", "-q"], capsys,
             tmp_path, "holds the input")  # fmt: skip
    assert a.is_dir() and b.is_dir()


def test_reference_weights_in_other_formats_are_not_copied(hf_pair, tmp_path):
    a, b, _, work = hf_pair
    (a / "pytorch_model.bin").write_bytes(b"old weights")
    (a / "original").mkdir()
    (a / "original" / "consolidated.00.pth").write_bytes(b"old weights")
    out = work / "out"
    assert main(["merge", str(a), str(b), "--method", "linear", "-o", str(out), "-q"]) == 0
    assert not (out / "pytorch_model.bin").exists() and not (out / "original").exists()
    assert (out / "tokenizer_config.json").is_file() and (out / "1_Pooling").is_dir()


@pytest.mark.parametrize("spec", ["gpu", "mps", "cuda:x", "cuda:7"])
def test_bad_device_values_are_one_line(pair, tmp_path, capsys, spec):
    a, b = pair
    argv = ["merge", a, b, "--method", "linear", "-o", tmp_path / "o.safetensors", "-q"]
    refused([*argv, "--device", spec], capsys, tmp_path, f"--device {spec}")


@pytest.mark.parametrize(
    "header",
    [
        '{"a": {"dtype": "F32", "shape": [0, 1000000000000000000000000000000], "data_offsets": [0, 0]}}',
        '{"a": {"dtype": "F32", "shape": [' + ",".join(["1"] * 200) + '], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "9" * 5000 + "]}}",
    ],
)
def test_headers_with_huge_numbers_fail_cleanly(tmp_path, header):
    import struct

    from metanet.shards import LazyWeights

    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(CheckpointError) as err:
        LazyWeights(path)
    assert len(str(err.value)) < 400


def test_space_apply_and_invert_check_the_element(pair):
    """A non-permutation (zeros, floats, a repeated or out-of-range index) is refused,
    naming the group, instead of silently duplicating units."""
    from metanet.space import WeightSpaceError

    weights, space = metanet.load(pair[0])
    g = space.random_element(torch.Generator().manual_seed(0))
    name = next(iter(g))
    size = g[name].numel()
    for bad, needle in (
        (torch.zeros(size, dtype=torch.long), "not a permutation"),
        (g[name].float(), "dtype"),
        (torch.arange(size) + 1, "not a permutation"),
    ):
        broken = {**g, name: bad}
        for call, args in ((space.apply, (weights, broken)), (space.invert, (broken,))):
            with pytest.raises(WeightSpaceError, match=needle) as err:
                call(*args)
            assert repr(name) in str(err.value)


# --------------------------------------------------------------------------- weight datasets
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from dataclasses import replace

    from tasks.datasets.inr import INRConfig, make_dataset

    root = tmp_path_factory.mktemp("ds") / "inrs"
    make_dataset(root, per_image=1, cfg=replace(INRConfig(), steps=2, target_psnr=None),
                 num_shards=1, progress=False)  # fmt: skip
    return root


@pytest.mark.parametrize(
    "spoil, what",
    [
        (lambda d: (d / "dataset.json").write_text("not json{"), "not readable JSON"),
        (lambda d: (d / "dataset.json").write_text("{}"), "'num_shards' is None"),
        (lambda d: (d / "dataset.json").write_text("[1, 2]"), "expected a JSON object"),
        (lambda d: (d / "space.json").write_text('{"tensors": 3}'), "not a WeightSpace"),
        (lambda d: _extra_row(d), "index rows but tensor"),
    ],
)
def test_broken_weight_datasets_are_named_in_one_line(tiny_dataset, tmp_path, capsys, spoil, what):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny_dataset, d)
    spoil(d)
    for argv in (["inr", "info", str(d)], ["train", "unf", str(d), "--epochs", "1", "--out",
                                           str(tmp_path / "run"), "-q"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert what in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def _extra_row(folder):
    """The shard's index claims one network more than its tensors hold."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tasks.datasets.inr import INDEX_KEY

    (shard,) = folder.glob("shard-*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        rows = json.loads(f.metadata()[INDEX_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(shard), metadata={INDEX_KEY: json.dumps(rows + rows[:1])})


@pytest.mark.parametrize(
    "argv, what",
    [
        (["inr", "make", "{tmp}/d", "--resolution", "0"], "--resolution"),
        (["inr", "make", "{tmp}/d", "--width", "-4"], "--width"),
        (["inr", "make", "{tmp}/d", "--lr", "nan"], "--lr"),
        (["inr", "make", "{tmp}/d", "--target-psnr", "inf"], "--target-psnr"),
        (["zoo", "make", "{tmp}/d", "--n", "-5"], "--n"),
        (["train", "unf", "{tmp}/d", "--batch-size", "0"], "--batch-size"),
        (["train", "unf", "{tmp}/d", "--lr", "nan"], "--lr"),
        (["train", "unf", "{tmp}/d", "--epochs", "0"], "--epochs"),
        (["create", "mlp", "-o", "{tmp}/x.safetensors", "--sizes", "1000000,1000000,10"],
         "more than create makes"),
        (["merge", "{tmp}/only.safetensors", "-o", "{tmp}/m.safetensors"], "at least two"),
    ],
)  # fmt: skip
def test_sizes_and_rates_are_checked_before_any_work(tmp_path, capsys, argv, what):
    try:
        rc = main([a.format(tmp=tmp_path) for a in argv])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert what in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- HF configs
@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    from tests.fixtures.architectures import hf_llama_with_vocab

    root = tmp_path_factory.mktemp("llamas")
    for i, name in enumerate("ab"):
        hf_llama_with_vocab(root / name, ["<unk>", "x", "y"], i)
    return root


@pytest.mark.requires("transformers")
@pytest.mark.parametrize(
    "change, what",
    [
        ({"model_type": "nonsense_model"}, "transformers cannot read it"),
        ({"num_attention_heads": "two"}, "transformers cannot read it"),
        ({"architectures": ["AutoTokenizer"]}, "not a transformers model class"),
        ({"hidden_size": 64}, "cannot build its LlamaForCausalLM"),
    ],
)
def test_broken_hf_configs_are_named_in_one_line(llama_pair, tmp_path, capsys, change, what):
    """Both folders share one broken config.json (so the layout check passes and the model
    is built): an unknown model_type, a field of the wrong type, ``architectures`` naming
    a transformers attribute that is no model, a config that disagrees with the weights."""
    import json
    import shutil

    for name in "ab":
        shutil.copytree(llama_pair / name, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg.update(change)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    refused(["align", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out", "-q"], capsys,
            tmp_path, what)  # fmt: skip


def test_training_that_diverges_stops_in_one_line(tiny_dataset, tmp_path, capsys):
    """A learning rate that sends the loss to NaN/inf stops the run at that epoch, with
    one line saying so (exit 2), instead of training on NaN and reporting it."""
    argv = ["train", "flat", str(tiny_dataset), "--epochs", "3", "--limit", "128",
            "--batch-size", "32", "--lr", "1e30", "--out", str(tmp_path / "run"), "-q"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "diverged in epoch 1" in err and "--lr" in err and "\n" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


# --------------------------------------------------------------------------- no code runs
def test_yaml_python_tags_run_nothing(pair, tmp_path, capsys):
    """A merge config with a ``!!python`` tag: refused in one line naming the config;
    the command it asks for never ran."""
    a, b = pair
    mark = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: "
        f"!!python/object/apply:os.system ['touch {mark}']\n  - model: {b}\n"
        "    parameters:\n      weight: 1.0\n"
    )
    refused(["merge", "--config", config, "-o", tmp_path / "out"], capsys, tmp_path, str(config))
    assert not mark.exists()


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("command", ["align", "merge"])
def test_auto_map_remote_code_is_refused(hf_pair, tmp_path, capsys, command):
    """``auto_map`` in config.json asks transformers to import the folder's own Python;
    metanet refuses the folder in one line and imports nothing from it."""
    import json

    a, b, _, work = hf_pair
    mark = work / "pwned"
    (b / "modeling_evil.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    cfg = json.loads((b / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (b / "config.json").write_text(json.dumps(cfg))
    argv = {"align": ["align", a, b, "-o", work / "out"],
            "merge": ["merge", a, b, "--method", "linear", "-o", work / "out"]}[command]  # fmt: skip
    refused(argv, capsys, work, "auto_map", "remote code")
    assert not mark.exists()
