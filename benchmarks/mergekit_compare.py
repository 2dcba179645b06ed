"""Compare ``tasks.merge_methods`` with mergekit on two small shared-base GPT-2 models.

Needs a separate venv with mergekit (``--mergekit-venv``, default /work/venv-mergekit):

    python3 -m venv /work/venv-mergekit
    /work/venv-mergekit/bin/pip install torch==2.13.0 && /work/venv-mergekit/bin/pip install mergekit
    OMP_NUM_THREADS=1 python benchmarks/mergekit_compare.py

Builds a random-init GPT-2 base (n_layer=2, n_embd=64) and fine-tunes it twice (60 Adam
steps each on two corpora generated from random Markov chains), then for each method writes a mergekit YAML config, runs
``mergekit-yaml`` on it and ``metanet merge --config`` on the same file (each in its own
process, so time and peak RSS include interpreter and torch start-up for both), and
reports the max abs difference of the merged tensors. DARE is random (mergekit draws from
the global RNG, we from a per-tensor generator), so for dare_ties only the relative
difference of the merged deltas' norms is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHOD_CONFIGS = {
    "linear": {
        "models": [
            {"model": "a", "parameters": {"weight": 0.3}},
            {"model": "b", "parameters": {"weight": 0.7}},
        ],
    },
    "slerp": {
        "base_model": "base",
        "models": [{"model": "a"}],
        "parameters": {"t": [{"filter": "attn", "value": 0.3}, {"value": 0.6}]},
    },
    "task_arithmetic": {
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5}},
            {"model": "b", "parameters": {"weight": 0.8}},
        ],
        "parameters": {"lambda": 0.9},
    },
    "ties": {
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.4, "density": 0.3}},
        ],
        "parameters": {"normalize": True},
    },
    "breadcrumbs": {
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.05}},
            {"model": "b", "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
        ],
    },
    "breadcrumbs_ties": {
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.7}},
            {"model": "b", "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "parameters": {"gamma": 0.02},
    },
    "model_stock": {"base_model": "base", "models": [{"model": "a"}, {"model": "b"}]},
    "dare_linear": {
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    },
    "dare_ties": {
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    },
}

# run in a fresh process: peak RSS of the child = the merge's own footprint
_TIMER = (
    "import resource, subprocess, sys, time, json\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "dt = time.perf_counter() - t\n"
    "print(json.dumps({'rc': r.returncode, 'time_s': dt, "
    "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
    "'stderr': r.stderr[-3000:]}))\n"
)


def timed(cmd: list[str], env: dict, cwd=None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _TIMER, *cmd],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=cwd,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def generated_text(seed: int, vocab: int, batches: int, batch: int = 16, length: int = 32):
    """Token batches from a random sparse Markov chain (a "corpus" per seed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # each token is followed by one of 8 successors, with random weights
    succ = torch.randint(0, vocab, (vocab, 8), generator=g)
    prob = torch.rand(vocab, 8, generator=g).softmax(-1)
    for _ in range(batches):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        seq = [tok]
        for _ in range(length - 1):
            pick = torch.multinomial(prob[tok], 1, generator=g).squeeze(1)
            tok = succ[tok, pick]
            seq.append(tok)
        yield torch.stack(seq, 1)


def make_models(folder: Path, seed: int = 0, steps: int = 60) -> dict:
    """A random-init GPT-2 base, fine-tuned twice (Adam, ``steps`` steps) on two
    generated corpora; returns each model's training loss before and after."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)
    base = GPT2LMHeadModel(cfg)
    base.save_pretrained(folder / "base")
    losses = {}
    for i, name in enumerate("ab"):
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(base.state_dict())
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        first = last = None
        for tokens in generated_text(100 + i, cfg.vocab_size, steps):
            loss = model(tokens, labels=tokens).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = float(loss) if first is None else first
            last = float(loss)
        losses[name] = (first, last)
        model.save_pretrained(folder / name)
    return losses


def load_sd(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-venv", default="/work/venv-mergekit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mergekit_compare.md"))
    ap.add_argument("--methods", nargs="*", default=list(METHOD_CONFIGS))
    args = ap.parse_args()

    import torch
    import yaml

    torch.set_num_threads(1)
    mk = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    if not mk.exists():
        sys.exit(f"no mergekit-yaml in {args.mergekit_venv}")
    mk_version = subprocess.run(
        [
            str(Path(args.mergekit_venv) / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        losses = make_models(tmp)
        print(json.dumps({"fine-tune loss (first, last)": losses}), flush=True)
        base_sd = load_sd(tmp / "base")
        for method in args.methods:
            spec = json.loads(
                json.dumps({"merge_method": method, **METHOD_CONFIGS[method], "dtype": "float32"})
            )
            # absolute paths: mergekit takes a bare relative name for a hub id
            for m in spec["models"]:
                m["model"] = str(tmp / m["model"])
            if "base_model" in spec:
                spec["base_model"] = str(tmp / spec["base_model"])
            cfg_path = tmp / f"{method}.yml"
            cfg_path.write_text(yaml.safe_dump(spec, sort_keys=False))
            mk_out = tmp / f"mk_{method}"
            r_mk = timed([str(mk), str(cfg_path), str(mk_out)], env, cwd=tmp)
            # ours through the CLI a user runs, on the same config file (a folder out)
            ours_out = tmp / f"ours_{method}"
            r_ours = timed(
                [sys.executable, "-m", "metanet.cli", "merge", "--config", str(cfg_path),
                 "-o", str(ours_out), "-q"],
                env,
            )  # fmt: skip
            row = {"method": method, "mk": r_mk, "ours": r_ours}
            if r_mk["rc"] == 0 and r_ours["rc"] == 0:
                a, b = load_sd(mk_out), load_sd(ours_out)
                common = [k for k in b if k in a and b[k].is_floating_point()]
                row["n_common"], row["n_ours"], row["n_mk"] = len(common), len(b), len(a)
                row["only_ours"] = sorted(set(b) - set(a))[:4]
                row["only_mk"] = sorted(set(a) - set(b))[:4]
                if common:
                    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in common}
                    worst = max(diffs, key=diffs.get)
                    row["max_abs"], row["worst"] = diffs[worst], worst
                    scale = max(b[k].abs().max().item() for k in common)
                    row["scale"] = scale
                    if method.startswith("dare"):
                        num = (
                            sum(
                                ((a[k].double() - base_sd[k].double()).norm() ** 2).item()
                                for k in common
                            )
                            ** 0.5
                        )
                        den = (
                            sum(
                                ((b[k].double() - base_sd[k].double()).norm() ** 2).item()
                                for k in common
                            )
                            ** 0.5
                        )
                        row["delta_norm_ratio"] = num / den
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("mk", "ours")}), flush=True)
            for side in ("mk", "ours"):
                if row[side]["rc"] != 0:
                    print(f"{method} {side} failed:\n{row[side]['stderr']}", flush=True)

    lines = [
        "# metanet merge --config vs mergekit",
        "",
        f"mergekit {mk_version}, torch {torch.__version__}, CPU, 1 thread. A random-init GPT-2 "
        "(n_layer=2, n_embd=64, vocab 512) fine-tuned twice, 60 Adam steps each on text generated by two random "
        "Markov chains (training loss "
        + ", ".join(f"{k}: {v[0]:.2f} -> {v[1]:.2f}" for k, v in losses.items())
        + "), float32 throughout. Each merge runs in a fresh "
        "process: time and peak RSS include Python/torch start-up (mergekit also imports transformers etc.). "
        "`python benchmarks/mergekit_compare.py` regenerates this file.",
        "",
        "| method | max abs diff | tensors compared | mergekit time (s) | ours time (s) | mergekit peak RSS (MB) | ours peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "max_abs" in r:
            diff = f"{r['max_abs']:.2e}"
            if "delta_norm_ratio" in r:
                diff = f"random (‖Δ_mk‖/‖Δ_ours‖ = {r['delta_norm_ratio']:.3f})"
        else:
            diff = "failed: " + ("mergekit" if r["mk"]["rc"] else "ours")
        lines.append(
            f"| {r['method']} | {diff} | {r.get('n_common', 0)} | {r['mk']['time_s']:.2f} | {r['ours']['time_s']:.2f} "
            f"| {r['mk']['peak_rss_mb']:.0f} | {r['ours']['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "The deterministic methods agree to float32 rounding. Both sides are their CLI in a fresh process on the same YAML file; times include interpreter, torch and transformers start-up and, for ours, building the base model and converting its WeightSpace (the function check of an alignment needs it), on a shared 2-core machine, so they say little about merge throughput on real models. slerp uses a filtered `t` (0.3 on `attn` tensors, 0.6 elsewhere).",
    ]
    extra = {tuple(r.get("only_mk", [])) for r in rows if r.get("only_mk")}
    if extra:
        lines += ["", f"Tensors only in mergekit's output (not compared): {sorted(extra)[0]}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
