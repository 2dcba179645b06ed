"""UNF layers sized by the symmetric structure, not by vocabulary × width.

``UNFLinear(space, 1, 1, basis="nfn")`` built on real Hugging Face spaces whose large
tensors are fully fixed (the word embeddings: the residual stream of a model that returns
it is an output, so fixed): the real all-MiniLM-L6-v2 (30,522 × 384) and GPT-2-size
models with a 50,257-token vocabulary (GPT-2 small's config: 12 layers, width 768, random
weights: only the space matters), the base model (its hidden states out: the embedding
fully fixed) and the LM (the stream permutes). Each build runs in a fresh process from the space's JSON
(traced once beforehand): build seconds, the resident-set peak above the size before the
build, and the layer's parameter count.

The baseline is the same build at another commit (``--baseline``, default the commit
before the tensor-product cosines), run from a ``git worktree`` in the same session. Its
dense ``(max_fold × fold)`` cosine basis is 64 × 38.6M float64 values (19.8 GB) for the
GPT-2-size base model's embedding, more than this machine can spare, so a baseline whose
basis would exceed half the available memory is not run (said in the table).

    python benchmarks/unf_size.py
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
BASELINE = "fd9db05"  # main before UNF's tensor-product cosines

_BUILD = r"""
import json, sys, time, resource
sys.path.insert(0, sys.argv[1])
from metanet.space import WeightSpace
import metanet.nn.unf
from metanet.nn import UNFLinear
assert metanet.nn.unf.__file__.startswith(sys.argv[1]), metanet.nn.unf.__file__
space = WeightSpace.from_json(open(sys.argv[2]).read())
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss()
t = time.perf_counter()
layer = UNFLinear(space, 1, 1, basis="nfn")
dt = time.perf_counter() - t
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
print(json.dumps({"seconds": dt, "peak_gib": (peak - before) / 2**30,
                  "params": sum(p.numel() for p in layer.parameters()),
                  "widest_fold": max(p.fold for p in layer.pieces)}))
"""


def spaces(folder: Path) -> dict[str, Path]:
    """Trace the two models once; their spaces as JSON files."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from converters import from_module
    from tests.fixtures.architectures import _bert_inputs, hf_minilm

    out = {}
    model = hf_minilm()
    out["all-MiniLM-L6-v2 (real; vocab 30,522 × 384)"] = from_module(model, _bert_inputs())
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(use_cache=False)  # GPT-2 small's sizes, no key/value cache
    cfg._attn_implementation = "eager"
    ids = (torch.arange(8).reshape(1, 8),)
    # the base model returns its hidden states: the residual stream is an output, so the
    # 50,257 x 768 token embedding is fully fixed (as MiniLM's); with the LM head the
    # stream permutes and only the vocabulary axis is fixed
    gpt2 = transformers.GPT2Model(cfg).eval()
    out["GPT-2-size base model (vocab 50,257 × 768, 12 layers)"] = from_module(gpt2, ids)
    gpt2_lm = transformers.GPT2LMHeadModel(cfg).eval()
    out["GPT-2-size LM (the same with its tied head)"] = from_module(gpt2_lm, ids)
    paths = {}
    for i, (name, space) in enumerate(out.items()):
        paths[name] = folder / f"space{i}.json"
        paths[name].write_text(space.to_json())
    return paths


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024


def build(code_root: Path, space: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _BUILD, str(code_root), str(space)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=BASELINE, help="commit to build the baseline from")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "unf_size.md"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = spaces(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base),
                        args.baseline], check=True)  # fmt: skip
        rows = []
        try:
            for name, space in paths.items():
                ours = build(ROOT, space)
                # the baseline's dense basis: 64 rows over the widest fixed piece, float64
                dense = 64 * ours.get("widest_fold", 0) * 8
                if dense > 0.5 * _available():
                    old = {"error": f"not run: its dense basis alone is {dense / 1e9:.1f} GB"}
                else:
                    old = build(base, space)
                rows.append((name, old, ours))
                print(json.dumps({"model": name, "baseline": old, "ours": ours}), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip

    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else "–"

    lines = [
        f'`UNFLinear(space, 1, 1, basis="nfn")` build, one thread, a fresh process per build; '
        f"baseline: commit `{args.baseline}` (dense cosine basis over each fixed piece) in a "
        "git worktree, same run. `python benchmarks/unf_size.py` regenerates this file.",
        "",
        "| space | widest fixed piece (values) | baseline build (s) | baseline peak (GiB) "
        "| ours build (s) | ours peak (GiB) | parameters (ours) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, old, ours in rows:
        base_cells = (
            f"{cell(old, 'seconds', '{:.1f}')} | {cell(old, 'peak_gib', '{:.2f}')}"
            if "error" not in old
            else f"{old['error']} | –"
        )
        lines.append(
            f"| {name} | {ours.get('widest_fold', 0):,} | {base_cells} | "
            f"{cell(ours, 'seconds', '{:.2f}')} | {cell(ours, 'peak_gib', '{:.3f}')} | "
            f"{ours.get('params', 0):,} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
