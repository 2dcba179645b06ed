"""The checkpoint engine: mergekit's config language, config → plan → executor.

Expected values come from mergekit's documented semantics (gradients interpolated over a
slice's layers, embeddings and head at t = 0, slices renumbered, dtype = the dtype tensors
are loaded and merged in) and from the per-tensor library, not from the engine itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import metanet
from converters import from_state_dict
from metanet.cli import main
from tasks.checkpoints import (
    load_config,
    merge_checkpoints,
    merge_weights,
    open_checkpoint,
    parse_config,
    plan_merge,
)
from tasks.checkpoints.config import evaluate
from tasks.merge.methods import METHODS, merge_state_dicts
from tests.fixtures.architectures import hf_llama_with_vocab

pytestmark = pytest.mark.requires("transformers")  # every test here builds HF models
try:
    import transformers
except ImportError:  # the marker skips every test
    transformers = None

LAYERS = 4


def _tiny_llama(folder: Path, seed: int, base: dict | None = None, dtype=torch.float32) -> dict:
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if base is not None:  # a "fine-tune": the base plus a small delta
        with torch.no_grad():
            model.load_state_dict(base)
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}) + "\n")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = _tiny_llama(root / "base", 0)
    _tiny_llama(root / "a", 1, base)
    _tiny_llama(root / "b", 2, base)
    (root / "b" / "tokenizer_config.json").write_text('{"model_max_length": 99}\n')
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- config
def test_gradient_values_follow_mergekit():
    """A 5-anchor gradient over 32 layers, at t = i / 31 (mergekit's worked example)."""
    grad = [0, 0.5, 0.3, 0.7, 1]
    got = {i: evaluate("x", grad, "t", i / 31) for i in (0, 1, 7, 8, 15, 16, 24, 31)}
    want = {0: 0.0, 1: 0.0645, 7: 0.4516, 8: 0.4935, 15: 0.3129, 16: 0.3258, 24: 0.729, 31: 1.0}
    for i in want:
        assert abs(got[i] - want[i]) < 1e-4, (i, got[i])
    assert evaluate("x", [True, False], "normalize", 0.6) is True  # int(0.6 * 1) = 0
    filt = [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]
    assert evaluate("layers.3.mlp.up", filt, "t", 0.25) == 0.25
    assert evaluate("layers.3.attn.q", filt, "t", 0.25) == 0.5
    assert evaluate("x", [{"filter": "mlp", "value": 1}], "t", 0) is None  # falls through


def test_unused_known_parameter_warns_and_typo_is_an_error():
    with pytest.warns(UserWarning, match="does not use"):
        cfg = parse_config(
            {
                "merge_method": "slerp",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 0.5}}],
                "parameters": {"t": 0.5},
            }  # fmt: skip
        )
    assert cfg.ignored == ("models[0].weight",)
    with pytest.raises(ValueError, match="densty"):
        parse_config({"merge_method": "ties", "base_model": "b", "models": [
            {"model": "a", "parameters": {"densty": 0.5}}]})  # fmt: skip


# --------------------------------------------------------------------------- plans
def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_gradient_per_layer_and_head_at_t0(llamas, tmp_path):
    """slerp with a gradient t: layer i of 4 merged at t = value(i / 3), the embeddings,
    final norm and head at the gradient's first value."""
    cfg = load_config(
        _yaml(
            tmp_path / "slerp.yml",
            f"merge_method: slerp\nbase_model: {llamas / 'base'}\nmodels:\n"
            f"  - model: {llamas / 'a'}\nparameters:\n  t: [0.1, 0.9]\n",
        )
    )
    plan = plan_merge(cfg, {r: open_checkpoint(r) for r in cfg.paths()})
    by_name = {t.name: t for t in plan.tensors}
    for i in range(LAYERS):
        t = by_name[f"model.layers.{i}.mlp.up_proj.weight"].params["t"]
        assert abs(t - (0.1 + 0.8 * i / (LAYERS - 1))) < 1e-12
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert abs(by_name[name].params["t"] - 0.1) < 1e-12
    out = merge_checkpoints(cfg, tmp_path / "out")
    got, a, base = _weights(out), _weights(llamas / "a"), _weights(llamas / "base")
    name = "model.layers.2.self_attn.q_proj.weight"
    want = merge_state_dicts("slerp", [{name: a[name]}], {name: base[name]},
                             params={"t": 0.1 + 0.8 * 2 / 3})  # fmt: skip
    assert torch.equal(got[name], want[name])


def test_frankenmerge_slices_renumber_layers_and_update_the_config(llamas, tmp_path):
    """passthrough over [0, 3) of a then [1, 4) of b: 6 layers, renumbered; embeddings from
    a (the first slice), norm and head from b (the last); config and dtype updated; the
    output loads in transformers in the dtype written."""
    cfg = load_config(
        _yaml(
            tmp_path / "frank.yml",
            "merge_method: passthrough\nslices:\n"
            f"  - sources:\n      - model: {llamas / 'a'}\n        layer_range: [0, 3]\n"
            f"  - sources:\n      - model: {llamas / 'b'}\n        layer_range: [1, 4]\n"
            "dtype: bfloat16\n",
        )
    )
    out = merge_checkpoints(cfg, tmp_path / "frank")
    got, a, b = _weights(out), _weights(llamas / "a"), _weights(llamas / "b")
    suffix = "self_attn.o_proj.weight"
    for i in range(3):
        assert torch.equal(
            got[f"model.layers.{i}.{suffix}"], a[f"model.layers.{i}.{suffix}"].bfloat16()
        )
    for i in range(3):
        assert torch.equal(
            got[f"model.layers.{3 + i}.{suffix}"], b[f"model.layers.{1 + i}.{suffix}"].bfloat16()
        )
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"].bfloat16())
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and model.dtype == torch.bfloat16
    assert (out / "README.md").read_text().count("passthrough") >= 1
    assert "slices" in (out / "mergekit_config.yml").read_text()


def test_dtype_is_the_merge_dtype_and_out_dtype_the_written_one(llamas, tmp_path):
    cfg = load_config(
        _yaml(
            tmp_path / "ties.yml",
            f"merge_method: ties\nbase_model: {llamas / 'base'}\nmodels:\n"
            f"  - model: {llamas / 'a'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {llamas / 'b'}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "dtype: bfloat16\nout_dtype: float16\n",
        )
    )
    out = merge_checkpoints(cfg, tmp_path / "ties")
    got = _weights(out)
    sds = [_weights(llamas / n) for n in ("base", "a", "b")]
    bf = torch.bfloat16
    from tasks.merge.methods import merge_tensor

    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        want = merge_tensor("ties", name, [sds[1][name].to(bf), sds[2][name].to(bf)],
                            sds[0][name].to(bf), model_params=[{"weight": 0.5, "density": 0.5}] * 2,
                            compute_dtype=bf)  # fmt: skip
        assert got[name].dtype == torch.float16 and torch.equal(got[name], want.half())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16


def test_merge_without_alignment_builds_no_weight_space(llamas, tmp_path, monkeypatch):
    import converters
    import converters.module
    import converters.pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a model or WeightSpace was built for a merge that aligns nothing")

    monkeypatch.setattr(converters, "from_module", refuse)
    monkeypatch.setattr(converters.module, "from_module", refuse)
    monkeypatch.setattr(converters.pretrained, "hf_model", refuse)
    out = tmp_path / "lin"
    argv = ["merge", llamas / "a", llamas / "b", "--method", "linear", "-o", out, "-q"]
    assert main([str(x) for x in argv]) == 0
    a, b, got = _weights(llamas / "a"), _weights(llamas / "b"), _weights(out)
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7)


def test_tokenizer_source_and_chat_template(llamas, tmp_path):
    cfg = load_config(
        _yaml(
            tmp_path / "tok.yml",
            f"merge_method: linear\nmodels:\n  - model: {llamas / 'a'}\n  - model: {llamas / 'b'}\n"
            f"tokenizer_source: {llamas / 'b'}\nchat_template: chatml\n",
        )
    )
    out = merge_checkpoints(cfg, tmp_path / "tok")
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 99  # b's tokenizer, not the reference a's
    assert "<|im_start|>" in tok["chat_template"]


def test_integer_tensors_are_carried_never_averaged(tmp_path):
    """An integer tensor equal in every input is carried through; one that differs is
    refused, naming it (averaging step counters or token ids means nothing)."""
    from safetensors.torch import save_file

    w = torch.randn(4, 3)
    paths = []
    for i, steps in enumerate((7, 7, 9)):
        p = tmp_path / f"m{i}.safetensors"
        save_file({"0.weight": w + i, "steps": torch.tensor([steps])}, str(p))
        paths.append(str(p))
    ok = tmp_path / "ok.safetensors"
    assert main(["merge", paths[0], paths[1], "--method", "linear", "-o", str(ok), "-q"]) == 0
    got = load_file(str(ok))
    assert got["steps"].tolist() == [7] and torch.allclose(got["0.weight"], w + 0.5)
    bad = tmp_path / "bad.safetensors"
    assert main(["merge", paths[0], paths[2], "--method", "linear", "-o", str(bad), "-q"]) == 2
    assert not bad.exists()


# --------------------------------------------------------------------------- in memory = streaming
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_equals_the_library_bit_for_bit(tmp_path, method):
    """Every method: ``metanet merge`` (the engine, streaming from files),
    ``merge_weights`` (the engine on dicts in memory) and ``merge_state_dicts`` (the
    per-tensor rules alone) give the same bits, random masks included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    base = model.state_dict()
    space = from_state_dict(base, "mlp")
    paths, sds = [], []
    for i in range(3):
        sd = {k: v + 0.05 * (i > 0) * torch.randn_like(v) for k, v in base.items()}
        paths.append(tmp_path / f"m{i}.safetensors")
        metanet.save(paths[-1], sd, space)
        sds.append(sd)
    m = METHODS[method]
    params = {"t": 0.3} if method in ("slerp", "nearswap") else {}
    n_models = m.n_models or 2
    if m.needs_base:
        inputs, base_sd, others = paths[: n_models + 1], sds[0], sds[1 : n_models + 1]
    else:
        inputs, base_sd, others = paths[1 : n_models + 1], None, sds[1 : n_models + 1]
    mp = [{"density": 0.6} if "density" in m.model_params else {} for _ in others]
    argv = ["merge", *map(str, inputs), "--method", method, "--seed", "3", "-q"]
    argv += [f"--param=t={params['t']}"] if params else []
    if "density" in m.model_params:
        argv += ["--density", "0.6"]
    out = tmp_path / "out.safetensors"
    assert main([*argv, "-o", str(out)]) == 0
    want = merge_state_dicts(method, others, base_sd, params=params, model_params=mp, seed=3)
    got, _ = metanet.load(out)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the engine's Python face on the same dicts: the same bits again
    cfg = {"merge_method": method, "parameters": params,
           "models": [{"model": f"m{i + 1}", "parameters": p} for i, p in enumerate(mp)]}  # fmt: skip
    named = {f"m{i + 1}": sd for i, sd in enumerate(others)}
    if m.needs_base:
        cfg["base_model"], named["m0"] = "m0", base_sd
    mem = merge_weights(cfg, named, seed=3)
    assert set(mem) == set(got)
    for k in mem:
        assert torch.equal(mem[k], got[k]), k


# --------------------------------------------------------------------------- hub ids
def _hub_cache(root: Path, src: Path, repo: str, commit: str = "c0ffee" * 6 + "abcd") -> Path:
    """``src`` laid out as huggingface_hub caches ``repo``: refs/main, blobs, links."""
    org, name = repo.split("/")
    entry = root / f"models--{org}--{name}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    (entry / "blobs").mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snap


def test_hub_ids_resolve_offline_from_the_cache(llamas, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    _hub_cache(cache, llamas / "a", "org/tiny-a")
    _hub_cache(cache, llamas / "b", "org/tiny-b")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _yaml(tmp_path / "hub.yml", "merge_method: linear\nmodels:\n  - model: org/tiny-a\n"
                   "  - model: org/tiny-b@main\n")  # fmt: skip
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(config), "-o", str(out), "-q"]) == 0
    a, b, got = _weights(llamas / "a"), _weights(llamas / "b"), _weights(out)
    torch.testing.assert_close(
        got["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2
    )
    assert not any(p.is_symlink() for p in out.rglob("*"))  # the cache's links became files
    # a model not in the cache: exit 2, one line naming it, nothing written
    missing = _yaml(tmp_path / "missing.yml", "merge_method: linear\nmodels:\n"
                    "  - model: org/tiny-a\n  - model: org/not-here\n")  # fmt: skip
    before = _digest(tmp_path)
    capsys.readouterr()
    assert main(["merge", "--config", str(missing), "-o", str(tmp_path / "m2"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "org/not-here" in err[0] and "cache" in err[0]
    assert _digest(tmp_path) == before and not (tmp_path / "m2").exists()
    os.environ.pop("HF_HUB_OFFLINE", None)


# --------------------------------------------------------------------------- plain state dicts
def _cnn(seed: int) -> dict:
    """A named CNN (conv1, bn1, conv2, bn2, fc): its .safetensors keys come back sorted."""
    torch.manual_seed(seed)
    nn = torch.nn
    net = nn.Module()
    net.conv1, net.bn1 = nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6)
    net.conv2, net.bn2 = nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6)
    net.fc = nn.Linear(6, 3)
    for m in (net.bn1, net.bn2):  # statistics that are not the defaults
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_family_cnn_reads_pt_and_safetensors_alike(tmp_path):
    """The same weights as .pt (state-dict order) and .safetensors (stored sorted): the same
    WeightSpace, and the same aligned merge from the CLI."""
    from safetensors.torch import save_file

    outs = {}
    for suffix in (".pt", ".safetensors"):
        paths = []
        for seed in (0, 1):
            path = tmp_path / f"m{seed}{suffix}"
            sd = _cnn(seed)
            torch.save(sd, path) if suffix == ".pt" else save_file(sd, str(path))
            paths.append(str(path))
        out = tmp_path / f"merged{suffix}.safetensors"
        assert main(["merge", *paths, "--family", "cnn", "-o", str(out), "-q"]) == 0
        outs[suffix] = metanet.load(out)
    (wa, sa), (wb, sb) = outs[".pt"], outs[".safetensors"]
    assert sa == sb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_model_flag_derives_the_space_of_plain_state_dicts(tmp_path, capsys):
    """``--model module:factory`` on plain state dicts: the space is traced from the model
    (no --family needed), and the aligned output computes what B computed."""
    from safetensors.torch import save_file

    from tasks.datasets import digits

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"p{seed}.safetensors"
        save_file(digits.mlp(64, 2).state_dict(), str(path))
        paths.append(str(path))
    out = tmp_path / "aligned.safetensors"
    argv = ["align", *paths, "-o", str(out), "--model", "tests.cli_models:digits_mlp"]
    assert main(argv) == 0
    assert "same function" in capsys.readouterr().err
    weights, space = metanet.load(out)
    assert space.groups and set(weights) == set(load_file(paths[1]))


def test_several_aligned_models_are_each_matched_to_the_reference(tmp_path):
    """Two noisy permuted copies of A, both ``align: weight``: each must be matched to A
    itself. (A function check streams a model into A's built model, whose tensors the
    matching reads: matched one after the other, the second copy was matched to the
    first one's aligned weights.) The merge equals the in-memory computation."""
    import warnings

    from converters import from_module
    from converters.pretrained import hf_model
    from tasks.align import weight_matching

    _tiny_llama(tmp_path / "A", 0)
    model, inputs = hf_model(tmp_path / "A")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = from_module(model, inputs)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copies = []
    for i, name in enumerate(("B", "C")):
        gen = torch.Generator().manual_seed(10 + i)
        noisy = {k: v + 3 * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1
                 else v for k, v in original.items()}  # fmt: skip
        copies.append(space.apply(noisy, space.random_element(gen)))
        model.load_state_dict(copies[-1])
        model.save_pretrained(tmp_path / name)
    cfg = _yaml(tmp_path / "m.yml", f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'A'}\n"
                f"  - model: {tmp_path / 'B'}\n    align: weight\n"
                f"  - model: {tmp_path / 'C'}\n    align: weight\n")  # fmt: skip
    out = tmp_path / "out"
    assert main(["merge", "--config", str(cfg), "-o", str(out), "-q"]) == 0
    aligned = [space.apply(c, weight_matching(space, original, c)) for c in copies]
    got = _weights(out)
    prefix = model.base_model_prefix + "."
    for k, v in original.items():
        want = (v + aligned[0][k] + aligned[1][k]) / 3
        key = k if k in got else k.removeprefix(prefix)
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- vocabularies
@pytest.fixture(scope="module")
def vocab_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    a = hf_llama_with_vocab(root / "a", ["<unk>", "the", "cat", "sat", "on"], 1,
                            special=("<|im_start|>",))  # fmt: skip
    b = hf_llama_with_vocab(root / "b", ["<unk>", "sat", "the", "dog", "mat", "on"], 2)
    return root, a, b


EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def test_union_tokenizer_merges_rows_by_token(vocab_pair, tmp_path):
    """mergekit's rules: the union vocabulary (base's, then the others' new tokens, then the
    added ones); a token both models have is merged from both rows, one only a model has
    takes that model's row in every model. The output loads in the dtype written."""
    root, a, b = vocab_pair
    cfg = parse_config({
        "merge_method": "linear",
        "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}},
                   {"model": str(root / "b"), "parameters": {"weight": 0.5}}],
        "tokenizer_source": "union",
        "out_dtype": "bfloat16",
    })  # fmt: skip
    out = merge_checkpoints(cfg, tmp_path / "union")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    want = ["<unk>", "the", "cat", "sat", "on", "<|im_start|>", "dog", "mat"]
    assert sorted(tok.get_vocab(), key=tok.get_vocab().get) == want
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 8
    got = _weights(out)
    ia = {t: i for i, t in enumerate(["<unk>", "the", "cat", "sat", "on", "<|im_start|>"])}
    ib = {"<unk>": 0, "sat": 1, "the": 2, "dog": 3, "mat": 4, "on": 5}
    for name in EMBEDDINGS:
        for i, token in enumerate(want):
            if token in ia and token in ib:
                expect = (a[name][ia[token]] + b[name][ib[token]]) / 2
            else:
                expect = a[name][ia[token]] if token in ia else b[name][ib[token]]
            torch.testing.assert_close(got[name][i], expect.to(torch.bfloat16), rtol=0, atol=0)
    # the rest of the model merges as usual
    expect = ((a["model.norm.weight"] + b["model.norm.weight"]) / 2).to(torch.bfloat16)
    assert torch.equal(got["model.norm.weight"], expect)


def test_tokenizer_block_sets_token_rows_and_pads(vocab_pair, tmp_path):
    root, a, b = vocab_pair
    cfg = parse_config({
        "merge_method": "task_arithmetic",
        "base_model": str(root / "a"),
        "models": [{"model": str(root / "b"), "parameters": {"weight": 1.0}}],
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 5,
            "tokens": {
                "dog": {"source": {"kind": "zero"}},
                "<|im_start|>": {"source": {"kind": "model_token", "model": str(root / "b"),
                                            "token": "sat"}, "force": True},
            },
        },
    })  # fmt: skip
    got = _weights(merge_checkpoints(cfg, tmp_path / "block"))
    name = "model.embed_tokens.weight"
    assert got[name].shape == (10, 16)  # 8 tokens, padded to a multiple of 5
    # task arithmetic: base + (b - base). dog: the base lacks it, so its row is the zero
    # default and b's own row comes through whole
    torch.testing.assert_close(got[name][6], b[name][3], rtol=0, atol=0)
    torch.testing.assert_close(got[name][5], b[name][1], rtol=0, atol=0)  # b's "sat" row
    assert torch.allclose(got[name][8], got[name][:8].mean(0), atol=1e-6)  # padding
    torch.testing.assert_close(got[name][3], b[name][1], rtol=0, atol=1e-6)  # sat: b's own


def test_tokenizer_config_errors_are_one_line():
    for data, what in [
        ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "give one"),
        (
            {"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "m"}}}}},
            "exactly one of token",
        ),
        ({"tokenizer": {"tokens": {"x": {"source": "elsewhere"}}}}, "not one of the merged"),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
        ({"tokenizer": {"sauce": "union"}}, "expected a mapping of source"),
    ]:
        with pytest.raises(ValueError, match=what) as e:
            parse_config({"merge_method": "linear", "models": [{"model": "m"}], **data})
        assert "\n" not in str(e.value)


def test_union_of_models_without_tokenizers_is_refused_naming_the_model(llamas, tmp_path, capsys):
    cfg = _yaml(
        tmp_path / "u.yml",
        f"merge_method: linear\nmodels:\n  - model: {llamas / 'a'}\n  - model: {llamas / 'b'}\n"
        "tokenizer_source: union\n",
    )
    assert main(["merge", "--config", str(cfg), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer does not load" in err and str(llamas / "a") in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_merge_weights_aligns_in_memory():
    """``align: weight`` on dicts in memory: a network and a permuted copy of it merge
    back into the network (the copy matched onto it first); unaligned, they do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    a = {k: v.double() for k, v in model.state_dict().items()}
    space = from_state_dict(a, "mlp")
    b = space.apply(a, space.random_element(torch.Generator().manual_seed(1)))
    cfg = {"merge_method": "linear", "dtype": "float64",
           "models": [{"model": "a", "parameters": {"weight": 0.5}},
                      {"model": "b", "parameters": {"weight": 0.5}, "align": "weight"}]}  # fmt: skip
    merged = merge_weights(cfg, {"a": a, "b": b}, spaces={"a": space})
    for k in a:
        torch.testing.assert_close(merged[k], a[k], rtol=0, atol=1e-12)
    cfg["models"][1]["align"] = "none"
    naive = merge_weights(cfg, {"a": a, "b": b})
    assert not torch.allclose(naive["0.weight"], a["0.weight"])


def test_loading_a_folder_shows_progress(llamas, tmp_path, capsys):
    """Building a folder's model and tracing its WeightSpace (seconds on a large model)
    shows a bar naming the folder and the step (#26: loading showed nothing)."""
    from tasks.checkpoints import align_checkpoint

    align_checkpoint(llamas / "a", llamas / "b", tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "load b" in err and "tracing its WeightSpace" in err and "weight matching" in err
