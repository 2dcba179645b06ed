"""Streaming align/merge (``tasks.checkpoints.stream``, ``metanet.shards``): one tensor at a time,
drop-in Hugging Face copies, clean failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import metanet
from converters import from_module, from_state_dict
from metanet.cli import main
from metanet.shards import INDEX, TMP_MARK, LazyWeights, ShardWriter, parse_size
from tasks.align import weight_matching

ROOT = Path(__file__).resolve().parents[2]


def _mlp_checkpoint(path: Path, sizes, seed: int, nan: str | None = None) -> Path:
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    sd = torch.nn.Sequential(*layers).state_dict()
    space = from_state_dict(sd, "mlp")
    if nan is not None:
        sd[nan].view(-1)[3] = float("nan")
    metanet.save(path, sd, space)
    return path


# --------------------------------------------------------------------------- shards
def test_lazy_weights_and_shard_writer_round_trip(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(40, 40, dtype=torch.float64),
    }
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardWriter(tmp_path, plan, max_shard=200)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    index = json.loads((tmp_path / INDEX).read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) >= 2 and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in tensors.values()
    )
    merged = {}
    for f in files:  # safetensors itself reads our shards
        merged.update(load_file(tmp_path / f))
    lazy = LazyWeights(tmp_path, upcast=torch.float32)
    for k, v in tensors.items():
        assert torch.equal(merged[k], v)
        assert torch.equal(lazy.read(k), v) and lazy.info(k) == (tuple(v.shape), v.dtype)
    assert lazy["b"].dtype == torch.float32 and lazy["d"].dtype == torch.float64
    assert not any(TMP_MARK in p.name for p in tmp_path.iterdir())


def test_shard_writer_refuses_out_of_plan_writes(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32)], single_file=True)
    with pytest.raises(ValueError, match="'a'"):
        w.write("a", torch.zeros(3))
    with pytest.raises(KeyError, match="'b'"):
        w.write("b", torch.zeros(2))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("500") == 500
    for bad in ("x", "-1MB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_lazy_matching_equals_in_memory(tmp_path):
    a = _mlp_checkpoint(tmp_path / "a.safetensors", [12, 16, 16, 3], 0)
    b = _mlp_checkpoint(tmp_path / "b.safetensors", [12, 16, 16, 3], 1)
    wa, space = metanet.load(a)
    wb, _ = metanet.load(b)
    g_mem = weight_matching(space, wa, wb, seed=3)
    g_lazy = weight_matching(space, LazyWeights(a), LazyWeights(b), seed=3)
    assert all(torch.equal(g_mem[k], g_lazy[k]) for k in g_mem)
    for name in space.tensors:  # apply_tensor == apply, per tensor
        assert torch.equal(space.apply_tensor(name, wb[name], g_mem), space.apply(wb, g_mem)[name])


# --------------------------------------------------------------------------- CLI: files
def test_stream_align_and_merge_files(tmp_path, capsys):
    a = _mlp_checkpoint(tmp_path / "a.safetensors", [12, 16, 16, 3], 0)
    b = _mlp_checkpoint(tmp_path / "b.safetensors", [12, 16, 16, 3], 1)
    out = tmp_path / "b_aligned.safetensors"
    assert main(["align", str(a), str(b), "-o", str(out), "-q"]) == 0
    wa, space = metanet.load(a)
    wb, _ = metanet.load(b)
    aligned, space2 = metanet.load(out)
    assert space2 == space
    g = weight_matching(space, wa, wb)
    expect = space.apply(wb, g)
    assert all(torch.equal(aligned[k], expect[k]) for k in expect)
    low = tmp_path / "low.safetensors"  # matching from disk at every step: the same result
    assert main(["align", str(a), str(b), "-o", str(low), "--low-memory", "-q"]) == 0
    got, _ = metanet.load(low)
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    merged_path = tmp_path / "merged.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(merged_path), "-q"]) == 0
    merged, _ = metanet.load(merged_path)
    for k in wa:
        torch.testing.assert_close(merged[k], (wa[k] + expect[k]) / 2, rtol=0, atol=1e-6)
    naive = tmp_path / "naive.safetensors"
    assert main(["merge", str(a), str(b), "--method", "naive", "-o", str(naive), "-q"]) == 0
    got, _ = metanet.load(naive)
    for k in wa:
        torch.testing.assert_close(got[k], (wa[k] + wb[k]) / 2, rtol=0, atol=1e-6)
    assert not any(TMP_MARK in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_checkpoint_named_and_nothing_written(tmp_path, capsys, value):
    a = _mlp_checkpoint(tmp_path / "a.safetensors", [8, 6, 2], 0)
    b = _mlp_checkpoint(tmp_path / "b.safetensors", [8, 6, 2], 1, nan="2.weight")
    if value == "inf":
        sd, space = metanet.load(b)
        sd["2.weight"].view(-1)[3] = float("inf")
        metanet.save(b, sd, space)
    before = sorted(os.listdir(tmp_path))
    for argv in (
        ["align", str(a), str(b), "-o", str(tmp_path / "out.safetensors")],
        ["merge", str(a), str(b), "--method", "naive", "-o", str(tmp_path / "m.safetensors")],
    ):
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert "'2.weight'" in err and str(b) in err and value in err.lower()
        assert len(err.strip().splitlines()) == 1
        assert sorted(os.listdir(tmp_path)) == before


def _python(*args):
    return [sys.executable, "-m", "metanet.cli", *args]


def _merge_then_signal(tmp_path, signals):
    """A ``metanet merge`` of two 15M-parameter MLPs over an existing output, and
    ``signals(proc)`` called once its temporary output appears: ``(a, b, out, proc,
    stderr)``."""
    a = _mlp_checkpoint(tmp_path / "a.safetensors", [2000, 3000, 3000, 10], 0)
    b = _mlp_checkpoint(tmp_path / "b.safetensors", [2000, 3000, 3000, 10], 1)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous output")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    argv = _python("merge", str(a), str(b), "--method", "naive", "-o", str(out), "--force")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(TMP_MARK in p.name for p in tmp_path.iterdir()):
            signals(proc)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=120)
    return a, b, out, proc, err


def test_sigterm_mid_write_keeps_old_output_and_next_run_cleans(tmp_path):
    a, b, out, proc, err = _merge_then_signal(tmp_path, lambda p: p.send_signal(signal.SIGTERM))
    if proc.returncode == 0:
        pytest.skip("the write finished before SIGTERM could land")
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"interrupted" in err
    assert out.read_bytes() == b"previous output"
    assert not any(TMP_MARK in p.name for p in tmp_path.iterdir())
    # kill -9 leaves a temporary file behind: the next run of the same output removes it
    stale = tmp_path / f".{out.name}{TMP_MARK}999999999"
    stale.write_bytes(b"x" * 100)
    assert (
        main(["merge", str(a), str(b), "--method", "naive", "-o", str(out), "--force", "-q"]) == 0
    )
    assert not stale.exists() and not any(TMP_MARK in p.name for p in tmp_path.iterdir())
    metanet.load(out)


def test_repeated_signals_while_unwinding(tmp_path):
    """A SIGTERM, then SIGTERMs and a SIGINT every millisecond while the first one unwinds:
    still one line and exit 130, no traceback, no temporary file, the old output intact."""

    def storm(proc):
        for k in range(200):
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGINT if k % 7 == 3 else signal.SIGTERM)
            time.sleep(0.001)

    _, _, out, proc, err = _merge_then_signal(tmp_path, storm)
    if proc.returncode == 0:
        pytest.skip("the write finished before the signals could land")
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "Traceback" not in text and text.strip().splitlines()[-1].endswith("interrupted")
    assert out.read_bytes() == b"previous output"
    assert not any(TMP_MARK in p.name for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- CLI: HF
@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    """The real MiniLM folder as a sentence-transformers folder (subfolder, modules.json),
    and a relabelled copy of it saved sharded."""
    from converters.pretrained import hf_model
    from tests.fixtures.architectures import minilm_dir

    root = tmp_path_factory.mktemp("minilm")
    src = root / "a"
    shutil.copytree(minilm_dir(), src)
    if not (src / "1_Pooling").is_dir():  # the package ships one; make sure of it
        (src / "1_Pooling").mkdir()
        (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    model, inputs = hf_model(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = from_module(model, inputs)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(
        space.apply(original, space.random_element(torch.Generator().manual_seed(0)))
    )
    b = root / "b"
    shutil.copytree(src, b, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(root / "b_saved", max_shard_size="20MB")
    for f in (root / "b_saved").iterdir():
        if f.name.endswith(".safetensors") or f.name == INDEX:
            shutil.copyfile(f, b / f.name)
    return src, b, original, inputs


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.requires("transformers")
def test_hf_align_output_is_a_drop_in_copy(minilm_pair, tmp_path, capsys):
    import transformers

    a, b, original, inputs = minilm_pair
    out = tmp_path / "aligned"
    old = os.umask(0o027)
    try:
        assert main(["align", str(a), str(b), "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert "same function" in capsys.readouterr().err
    src, got = _files(b), _files(out)
    assert set(src) == set(got)  # every file and subfolder, the shard layout kept
    weights = {k for k in src if k.endswith(".safetensors")}
    assert len(weights) >= 2 and INDEX in src
    for k in src:  # byte for byte, except the weights
        if k not in weights:
            assert got[k] == src[k], k
    for p in [out, *out.rglob("*")]:  # modes follow the umask, not mkdtemp's 0700/0600
        want = 0o750 if p.is_dir() else 0o640
        assert p.stat().st_mode & 0o777 == want, p
    model = transformers.AutoModel.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k  # aligned back onto a exactly
    ref = transformers.AutoModel.from_pretrained(b).eval()
    with torch.no_grad():
        y_b = ref(*inputs).last_hidden_state
        y = model.eval()(*inputs).last_hidden_state
    torch.testing.assert_close(y, y_b, rtol=1e-5, atol=1e-5)


@pytest.mark.requires("transformers")
def test_hf_reshard_and_metanet_file_output(minilm_pair, tmp_path):
    import transformers

    a, b, original, _ = minilm_pair
    out = tmp_path / "resharded"
    argv = ["merge", str(a), str(b), "--method", "naive", "--out-shard-size", "30MB"]
    assert main([*argv, "-o", str(out), "-q"]) == 0
    index = json.loads((out / INDEX).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert all(p.stat().st_size <= 30e6 + 25e6 for p in out.glob("*.safetensors"))
    transformers.AutoModel.from_pretrained(out)  # loads
    # -o *.safetensors writes a metanet checkpoint whatever the input (it carries its space)
    single = tmp_path / "aligned.safetensors"
    assert main(["align", str(a), str(b), "-o", str(single), "-q"]) == 0
    weights, space = metanet.load(single)
    for k in space.tensors:
        assert torch.equal(weights[k], original[k]), k


@pytest.mark.requires("transformers")
def test_file_order_and_tied_names(tmp_path):
    """A Llama with tied embeddings saves lm_head once: both names read the one tensor."""
    import transformers

    from tasks.checkpoints import open_checkpoint

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = open_checkpoint(tmp_path / "m", build_model=True)
    sd = ck.model.state_dict()
    for name in ck.space.tensors:
        assert torch.equal(ck.weights[name], sd[name]), name
    names = [n for _, ns in ck.file_order() for n in ns]
    assert len(names) == len(set(ck.lazy.names.values()))
    save_file({"x": torch.zeros(1)}, tmp_path / "unused.safetensors")  # keeps tmp_path busy


# --------------------------------------------------------------------------- mergekit methods
def test_cli_mergekit_methods_and_config_equal_the_library(tmp_path):
    from tasks.merge.methods import merge_state_dicts, merge_tensor

    base = _mlp_checkpoint(tmp_path / "base.safetensors", [10, 12, 4], 0)
    wb, space = metanet.load(base)
    tuned = []
    for seed in (1, 2):  # shared-base "fine-tunes"
        torch.manual_seed(seed)
        sd = {k: v + 0.05 * torch.randn_like(v) for k, v in wb.items()}
        tuned.append(tmp_path / f"t{seed}.safetensors")
        metanet.save(tuned[-1], sd, space)
    w1, w2 = metanet.load(tuned[0])[0], metanet.load(tuned[1])[0]
    paths = [str(base), *map(str, tuned)]

    out = tmp_path / "ties.safetensors"
    argv = ["merge", *paths, "--method", "dare_ties", "--density", "0.5", "--weights", "0.7,0.3"]
    assert main([*argv, "--seed", "4", "-o", str(out), "-q"]) == 0
    want = merge_state_dicts(
        "dare_ties", [w1, w2], wb, model_params=[{"density": 0.5, "weight": 0.7},
                                                  {"density": 0.5, "weight": 0.3}], seed=4
    )  # fmt: skip
    got, _ = metanet.load(out)
    assert all(torch.equal(got[k], want[k]) for k in want)

    out = tmp_path / "slerp.safetensors"
    assert main(["merge", paths[0], paths[1], "--method", "slerp", "--param", "t=0.3",
                 "-o", str(out), "-q"]) == 0  # fmt: skip
    want = merge_state_dicts("slerp", [w1], wb, params={"t": 0.3})
    got, _ = metanet.load(out)
    assert all(torch.allclose(got[k], want[k], atol=1e-7) for k in want)

    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        "merge_method: ties\n"
        "base_model: base.safetensors\n"
        "models:\n"
        "  - model: t1.safetensors\n"
        "    parameters: {weight: 1.0, density: [{filter: '0.', value: 0.3}, {value: 0.8}]}\n"
        "  - model: t2.safetensors\n"
        "    parameters: {weight: 0.5, density: 0.6}\n"
        "    align: weight\n"
        "dtype: float16\n"
    )
    out = tmp_path / "cfg.safetensors"
    assert main(["merge", "--config", str(cfg), "-o", str(out), "-q"]) == 0
    g = weight_matching(space, wb, w2)
    aligned2 = space.apply(w2, g)
    mp = lambda name: [  # noqa: E731
        {"weight": 1.0, "density": 0.3 if "0." in name else 0.8},
        {"weight": 0.5, "density": 0.6},
    ]
    # dtype: float16 as mergekit reads it: inputs loaded in float16, merged in float16
    half = torch.float16
    for k in wb:
        want = merge_tensor("ties", k, [w1[k].to(half), aligned2[k].to(half)], wb[k].to(half),
                            model_params=mp(k), compute_dtype=half)  # fmt: skip
        got, _ = metanet.load(out)
        assert got[k].dtype == half and torch.equal(got[k], want), k

    assert main(["merge", *paths, "--method", "slerp", "--param", "t=0.5", "-o",
                 str(tmp_path / "x.safetensors"), "-q"]) == 2  # fmt: skip
    assert main(["merge", "--config", str(cfg), paths[0], "-o", str(tmp_path / "y.safetensors"),
                 "-q"]) == 2  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
