"""Align and merge a 1.1B-parameter Llama pair through the CLI, on this machine.

Two random-init Llama models of TinyLlama's shape (hidden 2048, intermediate 5632, 22
layers, 32 heads, 4 key/value heads, vocab 32000; 1.1B parameters, 4.1 GiB each in float32)
are saved with ``save_pretrained`` (sharded at 2 GB), then

* ``metanet align A B -o ALIGNED`` and ``metanet merge A B -o MERGED`` run as a user runs
  them, each in a fresh process whose peak RSS is read from ``getrusage`` (children);
* the aligned folder is loaded with ``transformers`` and must compute B's logits
  (float32, relative error < 1e-5), and the merged folder must load;
* per-stage times and peak RSS come from the CLI (``METANET_STAGES_JSON``).

Writes ``benchmarks/results/scale.md``. Needs ~20 GB of disk and ~15 GiB of memory free.

    python benchmarks/scale.py --work /path/with/space
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
RUNNER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "dt = time.perf_counter() - t\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "print(f'{rc} {dt:.2f} {peak}')\n"
)


def make_pair(work: Path, shape: dict, quiet: bool) -> tuple[Path, Path]:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    paths = []
    for seed, name in ((0, "llama-a"), (1, "llama-b")):
        path = work / name
        paths.append(path)
        if (path / "config.json").is_file():
            continue
        t = time.perf_counter()
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
        model.save_pretrained(path, max_shard_size="2GB")
        del model
        if not quiet:
            print(f"made {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return paths[0], paths[1]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run_cli(args: list[str], stages: Path) -> dict:
    env = dict(os.environ, METANET_STAGES_JSON=str(stages))
    cmd = [sys.executable, "-c", RUNNER, sys.executable, "-m", "metanet.cli", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    last = out.stdout.strip().splitlines()[-1]
    rc, seconds, peak = last.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(args)} failed ({rc}):\n{out.stderr[-3000:]}")
    return {
        "seconds": float(seconds),
        "peak_rss": int(peak),
        "stages": json.loads(stages.read_text()) if stages.is_file() else [],
        "stdout": out.stdout.strip().splitlines()[:-1],
    }


def check_aligned(b: Path, aligned: Path, merged: Path, vocab: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 16))
    out = {}
    with torch.no_grad():
        mb = transformers.AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
        want = mb(tokens).logits
        del mb
        ma = transformers.AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
        got = ma(tokens).logits
        del ma
        out["aligned_rel_err"] = float((got - want).abs().max() / want.abs().max())
        if merged.is_dir():
            mm = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
            out["merged_finite"] = bool(torch.isfinite(mm(tokens).logits).all())
            del mm
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "scale")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.md")
    p.add_argument("--small", action="store_true", help="a 4-layer, hidden-256 pair (a smoke run)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--commands", default="align,merge", help="which CLI commands to run (align,merge)"
    )
    args = p.parse_args()
    shape = dict(SHAPE)
    if args.small:
        shape.update(hidden_size=256, intermediate_size=704, num_hidden_layers=4, vocab_size=4000)
    args.work.mkdir(parents=True, exist_ok=True)
    a, b = make_pair(args.work, shape, args.quiet)
    pair = folder_bytes(a) + folder_bytes(b)
    aligned, merged = args.work / "aligned", args.work / "merged"
    runs = {}
    if "align" in args.commands.split(",") or not aligned.is_dir():
        runs["align"] = run_cli(  # the checks below read the aligned folder
            ["align", str(a), str(b), "-o", str(aligned), "--force"], args.work / "align.json"
        )
        print(f"align: {runs['align']['seconds']:.0f} s", file=sys.stderr)
    if "merge" in args.commands.split(","):
        runs["merge"] = run_cli(
            ["merge", str(a), str(b), "-o", str(merged), "--force"], args.work / "merge.json"
        )
        print(f"merge: {runs['merge']['seconds']:.0f} s", file=sys.stderr)
    check = check_aligned(b, aligned, merged, shape["vocab_size"])
    n_params = pair // 8  # float32, two models
    lines = [
        "# Align and merge at scale (benchmarks/scale.py)",
        "",
        f"Pair: two random-init Llama models, {n_params / 1e9:.2f}B parameters each, "
        f"float32, {pair / 2**30:.2f} GiB together (sharded at 2 GB). Machine: 2 cores, 24 GiB."
        f" Shape: {json.dumps(shape)}.",
        "",
        "| command | wall time | peak RSS | peak / pair bytes | limit |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| metanet {name} | {r['seconds'] / 60:.1f} min | {r['peak_rss'] / 2**30:.2f} GiB "
            f"| {r['peak_rss'] / pair:.2f} | < 15 min, <= 1.50 |"
        )
    lines += [
        "",
        f"Aligned folder loaded with transformers: logits vs B, max relative error "
        f"{check['aligned_rel_err']:.1e} (target < 1e-5)."
        + (
            f" Merged folder loads, finite logits: {check['merged_finite']}."
            if "merged_finite" in check
            else " merge not run."
        ),
        "",
        "Per stage (time of the stage, peak RSS of the process up to its end):",
        "",
        "| command | stage | seconds | peak RSS so far |",
        "|---|---|---:|---:|",
    ]
    for name, r in runs.items():
        for s in r["stages"]:
            lines.append(
                f"| {name} | {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_gib']:.2f} GiB |"
            )
    # a 7B pair on paper. In memory, matching holds both sides (the built model's tensors
    # and the other read once): here that peak was the pair plus the working set. A
    # Llama-2-7B pair does not fit 60% of 24 GiB that way, so the CLI takes the disk path:
    # one model resident plus the tensors of the current step (read, permuted, multiplied:
    # about four float32 copies of the largest, the 32000 x 4096 embedding)
    first = next(iter(runs.values()))
    match = next(s for s in first["stages"] if s["stage"].startswith("match"))
    working = max(match["peak_rss_gib"] - pair / 2**30, 0.0)
    lines.append("")
    lines.append(
        f"In memory the match held both models ({pair / 2**30:.2f} GiB) plus a working set of "
        f"{working:.2f} GiB (peak {match['peak_rss_gib']:.2f} GiB)."
    )
    largest = 32000 * 4096 * 4 / 2**30
    for dtype, nbytes in (("float16", 2), ("float32", 4)):
        model7 = 6.74e9 * nbytes / 2**30
        est = model7 + 4 * largest + 0.5
        lines.append("")
        lines.append(
            f"On paper, a Llama-2-7B pair in {dtype} ({2 * model7:.1f} GiB) does not fit in "
            f"memory here, so matching reads from disk at every step (`--low-memory`): one "
            f"model ({model7:.1f} GiB) + ~4 float32 copies of the largest tensor "
            f"({4 * largest:.1f} GiB) + the interpreter (0.5 GiB) = ~{est:.1f} GiB peak "
            f"({est / (2 * model7):.2f} of the pair); "
            + ("fits 24 GiB." if est < 22 else "does not fit 24 GiB.")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
