"""``metanet merge --config`` beside ``mergekit-yaml`` on mergekit's own configs.

Every config of mergekit's ``examples/*.yml`` and of its ``tests/test_basic_merges.py``
(the Llama, GPT-2 and Granite ones), with the model names replaced by small local models
this script makes:

* a 40-layer Llama (hidden 32, 4 heads / 2 KV heads, vocab 128): ``base``, and ``a``,
  ``b``, ``c`` = the base plus a different small random delta each (a "fine-tune" of
  0.02 · N(0, 1) per entry), float32 on disk;
* a 12-layer GPT-2 (the tests' ``gpt2_like``) and two Granite models (``granite_a/b``).

Each config runs through both tools' CLIs in a fresh process (time and peak RSS include
start-up); the outputs are compared tensor by tensor:

* deterministic methods: the largest absolute difference (float32 outputs), or the
  largest difference in units in the last place of the output dtype (half outputs;
  mergekit writes float32 for ``arcee_fusion`` and ``ramplus_tl`` under ``dtype:
  bfloat16``, ours the bfloat16 asked for: compared in bfloat16);
* ``dare_ties`` and ``della`` draw random masks (mergekit from the global RNG, ours from
  a generator per tensor): the share of entries changed from the base and the norm of
  the merged delta, mean ± std over 4 seeds on each side.

Needs mergekit in its own venv (torch pinned to this one's):

    python3 -m venv /work/venv-mergekit
    /work/venv-mergekit/bin/pip install torch==2.13.0
    /work/venv-mergekit/bin/pip install -c <(echo torch==2.13.0) mergekit
    python benchmarks/mergekit_compare.py    # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# mergekit's examples/*.yml (0.1.x), the model names as written there
EXAMPLES = {
    "examples/arcee_fusion.yml": {
        "models": [{"model": "model_a"}, {"model": "model_b"}],
        "merge_method": "arcee_fusion",
        "base_model": "model_a",
        "dtype": "bfloat16",
    },
    "examples/bio-merge.yml": {
        "models": [
            {"model": "mistralai/Mistral-7B-Instruct-v0.2",
             "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": "BioMistral/BioMistral-7B", "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": "mistralai/Mistral-7B-v0.1",
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16",
    },
    "examples/gradient-slerp.yml": {
        "slices": [{"sources": [
            {"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 40]},
            {"model": "garage-bAInd/Platypus2-13B", "layer_range": [0, 40]},
        ]}],
        "merge_method": "slerp",
        "base_model": "psmathur/orca_mini_v3_13b",
        "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]},
        "dtype": "float16",
    },
    "examples/linear.yml": {
        "models": [
            {"model": "psmathur/orca_mini_v3_13b", "parameters": {"weight": 1.0}},
            {"model": "WizardLM/WizardLM-13B-V1.2", "parameters": {"weight": 0.3}},
            {"model": "garage-bAInd/Platypus2-13B", "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "float16",
    },
    "examples/orcamini-platy-44layer.yml": {
        "slices": [
            {"sources": [{"model": "psmathur/orca_mini_v3_13b", "layer_range": [0, 24]}]},
            {"sources": [{"model": "garage-bAInd/Platypus2-13B", "layer_range": [20, 40]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float16",
    },
    "examples/ties.yml": {
        "models": [
            {"model": "psmathur/orca_mini_v3_13b",
             "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": "garage-bAInd/Platypus2-13B",
             "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": "WizardLM/WizardMath-13B-V1.0",
             "parameters": {"density": 0.33,
                            "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        ],
        "merge_method": "ties",
        "base_model": "TheBloke/Llama-2-13B-fp16",
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float16",
    },
}  # fmt: skip

NAMES = {
    "model_a": "a",
    "model_b": "b",
    "model_c": "c",
    "mistralai/Mistral-7B-Instruct-v0.2": "a",
    "BioMistral/BioMistral-7B": "b",
    "mistralai/Mistral-7B-v0.1": "base",
    "psmathur/orca_mini_v3_13b": "a",
    "garage-bAInd/Platypus2-13B": "b",
    "WizardLM/WizardLM-13B-V1.2": "c",
    "WizardLM/WizardMath-13B-V1.0": "c",
    "TheBloke/Llama-2-13B-fp16": "base",
}


def _two(a, b, method, base=None, params=None) -> dict:
    """mergekit's tests' ``two_model_config``: weights 0.6 / 0.4, bfloat16."""
    cfg = {
        "merge_method": method,
        "models": [{"model": a, "parameters": {"weight": 0.6}},
                   {"model": b, "parameters": {"weight": 0.4}}],
        "dtype": "bfloat16",
    }  # fmt: skip
    if base:
        cfg["base_model"] = base
    if params:
        cfg["parameters"] = params
    return cfg


def test_configs() -> dict[str, dict]:
    """The configs of mergekit's tests/test_basic_merges.py (Llama, GPT-2, Granite)."""
    t = "tests/test_basic_merges.py::"
    out = {
        t + "granite_copy": {"merge_method": "passthrough", "models": [{"model": "granite_a"}],
                             "dtype": "bfloat16"},
        t + "granite_linear": {"merge_method": "linear", "dtype": "bfloat16", "models": [
            {"model": "granite_a", "parameters": {"weight": 0.6}},
            {"model": "granite_b", "parameters": {"weight": 0.4}}]},
        t + "granite_slerp": {"merge_method": "slerp", "base_model": "granite_a",
                              "models": [{"model": "granite_a"}, {"model": "granite_b"}],
                              "parameters": {"t": 0.5}, "dtype": "bfloat16"},
        t + "gpt2_copy": {"merge_method": "passthrough", "models": [{"model": "gpt2_like"}],
                          "dtype": "bfloat16"},
        t + "gpt2_stack": {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": "gpt2_like", "layer_range": [0, 12]}]}] * 2},
        t + "passthrough_scale": {"merge_method": "passthrough", "models": [
            {"model": "a", "parameters": {"scale": [{"filter": "o_proj", "value": 0},
                                                    {"value": 1}]}}]},
        t + "linear": _two("a", "b", "linear"),
        t + "slerp": {**_two("a", "b", "slerp", "a"), "parameters": {"t": 0.35}},
        t + "task_arithmetic": _two("a", "b", "task_arithmetic", "c"),
        t + "breadcrumbs": _two("a", "b", "breadcrumbs", "c"),
        t + "ties": _two("a", "b", "ties", "c", {"density": 0.3}),
        t + "sce": _two("a", "b", "sce", "c", {"select_topk": 0.5}),
        t + "ram": _two("a", "b", "ram", "c"),
        t + "ramplus_tl": _two("a", "b", "ramplus_tl", "c", {"r": 0.05, "alpha": 1.0}),
        t + "multislerp": _two("a", "b", "multislerp", "c"),
        t + "dare_ties": _two("a", "b", "dare_ties", "c", {"density": 0.66}),
        t + "model_stock": _two("b", "c", "model_stock", "a"),
        t + "model_stock_filterwise": _two("b", "c", "model_stock", "a", {"filter_wise": True}),
        t + "arcee_fusion": _two("a", "b", "arcee_fusion", "a"),
        t + "nearswap": _two("a", "b", "nearswap", "a", {"t": 0.0001}),
        t + "della": _two("a", "b", "della", "c",
                          {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
        t + "della_invalid_epsilon (both must refuse)": _two(
            "a", "b", "della", "c", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
        t + "karcher": _two("a", "b", "karcher", "c", {"max_iter": 5, "tol": 1e-5}),
    }  # fmt: skip
    for base in (None, "c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                key = f"{t}nuslerp base={base} row_wise={row_wise} flatten={flatten}"
                out[key] = _two("a", "b", "nuslerp", base,
                                {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})  # fmt: skip
    zero = _two("a", "b", "nuslerp", "c", {"nuslerp_row_wise": False, "nuslerp_flatten": False})
    zero["models"][0]["parameters"]["weight"] = -0.5
    zero["models"][1]["parameters"]["weight"] = 0.5
    out[t + "nuslerp weights summing to zero"] = zero
    return out


def tokenizer_configs() -> dict[str, dict]:
    """Models with different vocabularies: ``tokenizer_source`` and the ``tokenizer:``
    block of mergekit's docs (union, base, a model; token sources, force, padding)."""
    t = "tokenizers::"
    two = [{"model": "vocab_a", "parameters": {"weight": 0.6}},
           {"model": "vocab_b", "parameters": {"weight": 0.4}}]  # fmt: skip
    return {
        t + "union linear": {"merge_method": "linear", "models": two,
                             "tokenizer_source": "union", "dtype": "float32"},
        t + "union ties with a base": {
            "merge_method": "ties", "base_model": "vocab_base",
            "models": [{"model": "vocab_a", "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": "vocab_b", "parameters": {"weight": 0.5, "density": 0.5}}],
            "tokenizer_source": "union", "dtype": "float32"},
        t + "tokenizer block: tokens, force, pad": {
            "merge_method": "task_arithmetic", "base_model": "vocab_base", "models": two,
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
                "<|im_start|>": {"source": {"kind": "model_token", "model": "vocab_base",
                                            "token": "w0"}},
                "w50": {"source": "vocab_a", "force": True},
                "new3": {"source": {"kind": "zero"}}}},
            "dtype": "float32"},
        t + "base slerp": {"merge_method": "slerp", "base_model": "vocab_base",
                           "models": [{"model": "vocab_b"}], "parameters": {"t": 0.3},
                           "tokenizer_source": "base", "dtype": "float32"},
        t + "a model's tokenizer": {"merge_method": "linear", "models": two,
                                    "tokenizer_source": "vocab_b", "dtype": "bfloat16"},
    }  # fmt: skip


def make_vocab_models(root: Path) -> None:
    """Three 4-layer Llamas with word-level tokenizers: a base of 100 words; ``a`` drops 10
    of them and adds 12 new ones; ``b`` has the base's words in another order plus a
    special token."""
    import random

    sys.path.insert(0, str(ROOT))
    from tests.fixtures.architectures import hf_llama_with_vocab

    words = [f"w{i}" for i in range(100)]
    rng = random.Random(0)
    shuffled = words[:]
    rng.shuffle(shuffled)
    vocabs = {
        "vocab_base": (["<unk>", *words], ()),
        "vocab_a": (["<unk>", *words[10:], *(f"new{i}" for i in range(12))], ()),
        "vocab_b": (["<unk>", *shuffled], ("<|im_start|>",)),
    }
    for seed, (name, (tokens, special)) in enumerate(vocabs.items()):
        hf_llama_with_vocab(root / name, tokens, seed, special, hidden=32, layers=4)


def by_token(mk_out: Path, ours_out: Path, mk_sd: dict) -> bool:
    """Whether both outputs have the same vocabulary; if so, reorder mergekit's embedding
    rows (``mk_sd``, in place) into our token order. mergekit's union appends the other
    models' tokens in their tokenizer's hash-map order, which changes from run to run, so
    the two are compared token by token."""
    import transformers

    mk = transformers.AutoTokenizer.from_pretrained(str(mk_out)).get_vocab()
    ours = transformers.AutoTokenizer.from_pretrained(str(ours_out)).get_vocab()
    if set(mk) != set(ours):
        return False
    order = [mk[t] for t in sorted(ours, key=ours.get)]
    for key, t in mk_sd.items():
        if t.dim() == 2 and t.shape[0] >= len(order) and ("embed" in key or "lm_head" in key):
            rest = list(range(len(order), t.shape[0]))  # padding rows stay where they are
            mk_sd[key] = t[order + rest]
    return True


RANDOM = ("dare_ties", "della")

_TIMER = (
    "import resource, subprocess, sys, time, json\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "dt = time.perf_counter() - t\n"
    "print(json.dumps({'rc': r.returncode, 'time_s': dt, "
    "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
    "'stderr': r.stderr[-2000:]}))\n"
)


def timed(cmd: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _TIMER, *cmd], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_models(root: Path) -> None:
    import torch
    import transformers

    def finetunes(model, names, dtype=torch.float32):
        base = {k: v.clone() for k, v in model.state_dict().items()}
        for i, name in enumerate(names):
            torch.manual_seed(100 + i)
            with torch.no_grad():
                model.load_state_dict(base)
                if i:  # the first name is the base itself
                    for p in model.parameters():
                        p.add_(0.02 * torch.randn_like(p))
            model.to(dtype).save_pretrained(root / name)

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=40,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    finetunes(transformers.LlamaForCausalLM(llama), ["base", "a", "b", "c"])
    gpt2 = transformers.GPT2Config(n_layer=12, n_embd=32, n_head=4, vocab_size=128, n_positions=64)
    finetunes(transformers.GPT2LMHeadModel(gpt2), ["gpt2_like"])
    granite = transformers.GraniteConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    finetunes(transformers.GraniteForCausalLM(granite), ["granite_base", "granite_a", "granite_b"])


def localize(cfg: dict, root: Path) -> dict:
    def fix(ref):
        return str(root / NAMES.get(ref, ref))

    cfg = json.loads(json.dumps(cfg))
    if "base_model" in cfg:
        cfg["base_model"] = fix(cfg["base_model"])
    for m in cfg.get("models", []):
        m["model"] = fix(m["model"])
    for s in cfg.get("slices", []):
        for src in s["sources"]:
            src["model"] = fix(src["model"])
    if cfg.get("tokenizer_source") not in (None, "base", "union"):
        cfg["tokenizer_source"] = fix(cfg["tokenizer_source"])
    for tok in (cfg.get("tokenizer") or {}).get("tokens", {}).values():
        if isinstance(tok["source"], str):
            tok["source"] = fix(tok["source"])
        elif "model" in tok["source"]:
            tok["source"]["model"] = fix(tok["source"]["model"])
    return cfg


def load_sd(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulps(a, b) -> float:
    """Largest |a - b| in units in the last place of a's dtype at the larger magnitude."""
    import torch

    mant = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[a.dtype]
    x, y = a.double(), b.double()
    mag = torch.maximum(x.abs(), y.abs()).clamp(min=torch.finfo(a.dtype).tiny)
    spacing = torch.exp2(torch.floor(torch.log2(mag)) - mant)
    return float(((x - y).abs() / spacing).max())


def delta_stats(out: dict, base: dict) -> tuple[float, float]:
    """(share of float entries that differ from the base, norm of the merged delta)."""
    changed = total = 0
    sq = 0.0
    for k, v in out.items():
        if k in base and v.is_floating_point():
            d = v.double() - base[k].to(v.dtype).double()  # the base as the output's dtype
            changed += int((d != 0).sum())
            total += d.numel()
            sq += float((d * d).sum())
    return changed / total, math.sqrt(sq)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-venv", default="/work/venv-mergekit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mergekit_compare.md"))
    ap.add_argument("--only", help="run the configs whose name contains this")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per side for dare_ties/della")
    args = ap.parse_args(argv)

    import torch

    venv = Path(args.mergekit_venv)
    mk = venv / "bin" / "mergekit-yaml"
    if not mk.exists():
        sys.exit(f"no mergekit-yaml in {venv}")
    mk_version = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))  # fmt: skip
    import yaml

    configs = {**EXAMPLES, **test_configs(), **tokenizer_configs()}
    if args.only:
        configs = {k: v for k, v in configs.items() if args.only in k}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_models(tmp)
        make_vocab_models(tmp)
        for name, raw in configs.items():
            cfg = localize(raw, tmp)
            path = tmp / "config.yml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            method = cfg["merge_method"]
            seeds = range(args.seeds) if method in RANDOM else [0]
            runs = {"mk": [], "ours": []}
            for seed in seeds:
                mk_out, ours_out = tmp / f"mk{seed}", tmp / f"ours{seed}"
                for p in (mk_out, ours_out):
                    subprocess.run(["rm", "-rf", str(p)], check=True)
                r_mk = timed([str(mk), str(path), str(mk_out), "--random-seed", str(seed)], env)
                r_ours = timed([sys.executable, "-m", "metanet.cli", "merge", "--config",
                                str(path), "-o", str(ours_out), "-q", "--seed", str(seed)], env)  # fmt: skip
                r_mk["out"], r_ours["out"] = mk_out, ours_out
                runs["mk"].append(r_mk)
                runs["ours"].append(r_ours)
            row = {"config": name, "method": method,
                   "mk_ok": all(r["rc"] == 0 for r in runs["mk"]),
                   "ours_ok": all(r["rc"] == 0 for r in runs["ours"]),
                   "mk_time": statistics.fmean(r["time_s"] for r in runs["mk"]),
                   "ours_time": statistics.fmean(r["time_s"] for r in runs["ours"]),
                   "mk_rss": max(r["peak_rss_mb"] for r in runs["mk"]),
                   "ours_rss": max(r["peak_rss_mb"] for r in runs["ours"])}  # fmt: skip
            if not row["ours_ok"]:
                row["ours_err"] = runs["ours"][0]["stderr"].strip().splitlines()[-1:]
            if not row["mk_ok"]:
                row["mk_err"] = runs["mk"][0]["stderr"].strip().splitlines()[-1:]
            if row["mk_ok"] and row["ours_ok"]:
                if method in RANDOM:
                    base = load_sd(Path(cfg["base_model"]))
                    stats = {side: [delta_stats(load_sd(r["out"]), base) for r in runs[side]]
                             for side in ("mk", "ours")}  # fmt: skip
                    row["random"] = {
                        side: (statistics.fmean(s[0] for s in v), statistics.stdev(s[0] for s in v),
                               statistics.fmean(s[1] for s in v), statistics.stdev(s[1] for s in v))
                        for side, v in stats.items()
                    }  # fmt: skip
                else:
                    a, b = load_sd(runs["mk"][0]["out"]), load_sd(runs["ours"][0]["out"])
                    if "tokenizer" in cfg or "tokenizer_source" in cfg:
                        row["same_vocab"] = by_token(
                            runs["mk"][0]["out"], runs["ours"][0]["out"], a
                        )
                    row["same_keys"] = set(a) == set(b)
                    worst, unit, dtypes = 0.0, "abs", set()
                    for k in set(a) & set(b):
                        x, y = a[k], b[k]
                        if not y.is_floating_point():
                            continue
                        dtypes.add((str(x.dtype).removeprefix("torch."),
                                    str(y.dtype).removeprefix("torch.")))  # fmt: skip
                        if y.dtype in (torch.float16, torch.bfloat16):
                            worst, unit = max(worst, ulps(y, x.to(y.dtype))), "ulp"
                        else:
                            worst = max(worst, float((x.double() - y.double()).abs().max()))
                    row["diff"], row["unit"], row["dtypes"] = worst, unit, sorted(dtypes)

            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)

    n_mk = sum(r["mk_ok"] for r in rows)
    n_ours = sum(r["ours_ok"] for r in rows)
    both_refuse = [r for r in rows if "both must refuse" in r["config"]]
    lines = [
        f"mergekit {mk_version} (`mergekit-yaml`) beside `metanet merge --config`, torch "
        f"{torch.__version__}, CPU, one thread each, on the same YAML files: mergekit's "
        "`examples/*.yml` and the configs of its `tests/test_basic_merges.py` (model names "
        "replaced by small local models: a 40-layer Llama base and three fine-tunes of it, a "
        "12-layer GPT-2, two Granites; three 4-layer Llamas with different word-level "
        "vocabularies for the tokenizer configs). Each run is a fresh process: time and peak RSS include "
        "start-up. `python benchmarks/mergekit_compare.py` regenerates this file.",
        "",
        f"Configs run: **ours {n_ours} / {len(rows)}, mergekit {n_mk} / {len(rows)}** "
        f"({len(both_refuse)} of them must be refused by both: della with epsilon 1.35).",
        "",
        "| config | method | ours | mergekit | difference | ours time (s) | mergekit time (s) "
        "| ours peak RSS (MB) | mergekit peak RSS (MB) |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "random" in r:
            s = r["random"]
            diff = (f"random: changed {s['ours'][0]:.3f} ± {s['ours'][1]:.3f} vs "
                    f"{s['mk'][0]:.3f} ± {s['mk'][1]:.3f}; delta norm {s['ours'][2]:.3f} ± "
                    f"{s['ours'][3]:.3f} vs {s['mk'][2]:.3f} ± {s['mk'][3]:.3f}")  # fmt: skip
        elif "diff" in r:
            cast = "; ".join(f"mergekit wrote {m}, ours {o}" for m, o in r["dtypes"] if m != o)
            diff = (f"{r['diff']:.2g} {r['unit']}" if r["unit"] == "ulp"
                    else f"{r['diff']:.2g}")  # fmt: skip
            diff += f" ({cast})" if cast else ""
            diff += "" if r["same_keys"] else " (tensor names differ)"
            if "same_vocab" in r:
                diff += (
                    "; same vocabulary, rows compared by token"
                    if r["same_vocab"]
                    else "; VOCABULARIES DIFFER"
                )
        else:
            diff = "–"
        ours = "runs" if r["ours_ok"] else "refused: " + " ".join(r.get("ours_err", []))[:90]
        mk_cell = "runs" if r["mk_ok"] else "refused: " + " ".join(r.get("mk_err", []))[:90]
        lines.append(
            f"| {r['config']} | {r['method']} | {ours} | {mk_cell} | {diff} | {r['ours_time']:.1f} "
            f"| {r['mk_time']:.1f} | {r['ours_rss']:.0f} | {r['mk_rss']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
