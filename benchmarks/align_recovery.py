"""Does weight matching reach the optimum? Relabelled noisy copies (issue #28).

For each model: its weights as torchvision's constructor leaves them
(``tests.fixtures.large.torchvision_init``: norms 1 and 0, most biases 0), relabelled by
a random element of its WeightSpace (``space.random_element()``, ``space.apply``) and
perturbed by Gaussian noise of 1% of each tensor's std (float32). Weight matching of
the original ``a`` against the copy ``b`` should return the true inverse; reported:

* groups recovered (the element equals the true inverse on that group, per-head groups
  counted on their own), before (``schedule="random"``: the previous loop, identity
  start, random order, stop at the first sweep without gain) and now (the default);
* the distance ``|g·b - a|`` over the matched tensors, before / now / true inverse;
* time of each (the space is built once, not timed);
* ``rebasin`` (``PermutationCoordinateDescent``, PyPI) on the same pair, run in its own
  virtual environment (``--rebasin-python``, default ``/work/venv-rebasin``): distance
  and time, or why it failed.

Every model runs in a fresh subprocess (one large model in memory at a time), one torch
thread. Then (``--pairs``) the main job's trained pairs (``examples/align_and_merge.py``:
6 MLPs 3x512 and 6 small CNNs on digits, 15 epochs, 15 pairs each): barrier, objective
and matching time before and now, best of ``--repeats`` interleaved.

    python benchmarks/align_recovery.py                 # all: ~25 min on 2 busy cores
    python benchmarks/align_recovery.py --models efficientnet_b0 --no-pairs --no-rebasin

``--optima`` asks a narrower question on the trained pairs: does the objective weight
matching maximizes order their barriers? Each pair is matched by the previous loop with
``--before-seeds`` orders of its random schedule, by the default and, with
``--extra-starts K``, by the default with ``restarts=3..K+2``; per pair, these local
optima are compared by objective and barrier, and the default's barriers are paired
with the previous loop's (``results/align_optima.md``, ~30 min for 10 networks per model
with ``--extra-starts 6``, ~6 min without).

    python benchmarks/align_recovery.py --optima --pair-models 10 --extra-starts 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"
LARGE_MODELS = [
    "vit_b_16",
    "swin_t",
    "efficientnet_b0",
    "squeezenet1_0",
    "convnext_t",
    "densenet121",
]
SMALL_MODELS = ["vit_small", "fire_net", "efficientnet_tiny"]
LABELS = {
    "vit_b_16": "ViT-B/16",
    "swin_t": "Swin-T",
    "efficientnet_b0": "EfficientNet-B0",
    "squeezenet1_0": "SqueezeNet 1.0",
    "convnext_t": "ConvNeXt-T",
    "densenet121": "DenseNet-121",
    "vit_small": "pre-norm ViT (d 192, 3 heads, 4 blocks)",
    "fire_net": "FireNet (fire modules, concat)",
    "efficientnet_tiny": "EfficientNetTiny (depthwise + SE)",
}


def build(name: str):
    """``(model with torchvision's init, example inputs)``; needs only torch."""
    from tests.fixtures.architectures import ViTTiny, efficientnet_tiny, fire_net
    from tests.fixtures.large import LARGE, torchvision_init

    if name in LARGE:
        factory, inputs = LARGE[name]
        return torchvision_init(factory(0), 0), inputs()
    torch.manual_seed(0)
    if name == "vit_small":
        model = ViTTiny(image=32, patch=4, dim=192, heads=3, depth=4, mlp_dim=768)
        shape = (1, 3, 32, 32)
    else:
        model = {"fire_net": fire_net, "efficientnet_tiny": efficientnet_tiny}[name]()
        shape = (1, 3, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return torchvision_init(model, 0), (x,)


def relabelled_copy(space, weights, seed: int, noise: float = 0.01):
    """``(b, g)``: ``b = g·a`` plus Gaussian noise of ``noise`` times each tensor's std."""
    from tasks.align import matchable

    gen = torch.Generator().manual_seed(seed)
    g = space.random_element(gen)
    b = space.apply(weights, g)
    for k in matchable(space, weights):
        t = b[k]
        if t.numel() > 1:
            b[k] = t + noise * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return b, g


def distance(space, a, b, element=None) -> float:
    from tasks.align import matchable

    total = 0.0
    for n in matchable(space, a):
        w = b[n] if element is None else space.apply_tensor(n, b[n], element)
        total += float((w.double() - a[n].double()).pow(2).sum())
    return total**0.5


# --------------------------------------------------------------------------- workers
def worker(name: str, seed: int, rebasin_python: str | None, rebasin_timeout: float) -> dict:
    from converters import from_module
    from tasks.align import MatchLog, weight_matching

    torch.set_num_threads(1)
    model, x = build(name)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = from_module(model, x)
    out = {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": len(space.groups),
        "space_s": time.perf_counter() - t0,
    }
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    b, g = relabelled_copy(space, a, seed)
    inv = space.invert(g)
    out["true_dist"] = distance(space, a, b, inv)
    out["naive_dist"] = distance(space, a, b)
    for label, kw in (("before", {"schedule": "random"}), ("now", {})):
        log = MatchLog()
        t0 = time.perf_counter()
        h = weight_matching(space, a, b, log=log, **kw)
        out[label] = {
            "s": time.perf_counter() - t0,
            "ok": sum(torch.equal(h[n], inv[n]) for n in space.groups),
            "dist": distance(space, a, b, h),
            "sweeps": log.sweeps,
            "notes": log.notes,
        }
    if rebasin_python:
        out["rebasin"] = run_rebasin(name, a, b, space, rebasin_python, rebasin_timeout)
        if "error" not in out["rebasin"]:
            out["rebasin"]["preserved"] = preserved(model, b, out["rebasin"].pop("aligned"), x)
    return out


def run_rebasin(name, a, b, space, python: str, timeout: float) -> dict:
    """rebasin on (a, b) in its own environment: distance and time, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"a": a, "b": b}, f"{tmp}/pair.pt")
        cmd = [python, __file__, "--rebasin-worker", name, tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            return {"error": lines[-1][:300] if lines else f"exit {proc.returncode}"}
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        info["aligned"] = torch.load(f"{tmp}/aligned.pt", weights_only=True)
        info["dist"] = distance(space, a, info["aligned"])
        return info


@torch.no_grad()
def preserved(model, b, aligned, x) -> float:
    """Largest output change, relative to the largest output, from b to aligned b."""
    from torch.func import functional_call

    ref = functional_call(model, b, x)
    got = functional_call(model, aligned, x)
    if not ref.abs().max() > 0:  # torchvision's ViT starts with a zero head: says nothing
        return None
    return float((ref - got).abs().max() / ref.abs().max())


def rebasin_worker(name: str, folder: str) -> None:
    """In rebasin's environment: align b to a, save b's permuted state dict."""
    import logging

    from rebasin import PermutationCoordinateDescent

    torch.set_num_threads(1)
    pair = torch.load(f"{folder}/pair.pt", weights_only=True)
    model_a, x = build(name)
    model_b, _ = build(name)
    model_a.load_state_dict(pair["a"])
    model_b.load_state_dict(pair["b"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(
        model_a, model_b, input_data_b=x[0], logging_level=logging.ERROR
    )
    pcd.rebasin()
    seconds = time.perf_counter() - t0
    torch.save(model_b.state_dict(), f"{folder}/aligned.pt")
    print(json.dumps({"s": seconds}))


# --------------------------------------------------------------------------- pairs
def _main_job_pairs(n_models: int):
    """``(kind, space, test evaluator, (i, j), a, b)`` for every pair of the main job's
    ``n_models`` MLPs, then CNNs (``examples/align_and_merge.py``'s recipe), one thread."""
    from converters import from_module
    from tasks.datasets import digits
    from tasks.merge import evaluator

    torch.set_num_threads(1)
    data = digits.load()
    for kind in ("mlp", "cnn"):
        d = data.flat() if kind == "mlp" else data
        models = digits.main_job_models(kind, d, n_models, epochs=15)
        space = from_module(models[0], d.x_train[:2])
        test = evaluator(models[0], digits.batches(d.x_test, d.y_test), accuracy=True)
        for i, j in itertools.combinations(range(n_models), 2):
            yield kind, space, test, (i, j), models[i].state_dict(), models[j].state_dict()


def trained_pairs(repeats: int, n_models: int = 6) -> list[dict]:
    """The main job's pairs: barrier, objective and time, before and now."""
    from tasks.align import MatchLog, weight_matching
    from tasks.merge import loss_barrier

    rows = []
    for kind, space, test, (i, j), a, b in _main_job_pairs(n_models):
        best: dict[str, float] = {}
        res = {}
        for _ in range(repeats):  # interleaved: the load of the machine hits both
            for label, kw in (("before", {"schedule": "random"}), ("now", {})):
                log = MatchLog()
                t0 = time.perf_counter()
                g = weight_matching(space, a, b, log=log, **kw)
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - t0)
                res[label] = (g, log)
        row = {"kind": kind, "pair": (i, j)}
        for label, (g, log) in res.items():
            barrier = loss_barrier(test, a, space.apply(b, g), alphas=11).barrier
            row[label] = {
                "barrier": barrier,
                "objective": log.objective[-1],
                "s": best[label],
                "sweeps": log.sweeps,
            }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def optima(n_models: int, before_seeds: int, extra_starts: int = 0) -> list[dict]:
    """Per trained pair: barrier and objective of the previous loop's ``before_seeds``
    random orders, of the default (``"now"``) and of ``extra_starts`` runs of the default
    with more starts (``restarts=k``, random starts from ``seed=k``, k = 3, 4, ...)."""
    from tasks.align import MatchLog, weight_matching
    from tasks.merge import loss_barrier

    rows = []
    methods = {f"before, order {k}": {"schedule": "random", "seed": k} for k in range(before_seeds)}
    methods["now"] = {}
    for k in range(3, 3 + extra_starts):
        methods[f"now, restarts={k}"] = {"restarts": k, "seed": k}
    for kind, space, test, (i, j), a, b in _main_job_pairs(n_models):
        row = {"optima": kind, "pair": (i, j)}
        for label, kw in methods.items():
            log = MatchLog()
            g = weight_matching(space, a, b, log=log, **kw)
            barrier = loss_barrier(test, a, space.apply(b, g), alphas=11).barrier
            row[label] = {"barrier": barrier, "objective": log.objective[-1]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def optima_report(rows: list[dict], plot: Path | None) -> str:
    """Means over all pairs and over the main job's 15, paired differences now - before,
    and how well the objective orders the barriers of one pair's optima (Pearson
    correlation within each pair)."""
    import numpy as np

    labels = [k for k in rows[0] if k not in ("optima", "pair")]
    before = [lab for lab in labels if lab.startswith("before")]
    extra = [lab for lab in labels if lab.startswith("now, ")]
    n = 1 + max(max(r["pair"]) for r in rows)
    n_pairs = n * (n - 1) // 2
    ways = (
        f'the previous loop (`schedule="random"`) with {len(before)} orders of its random '
        f'schedule (`seed=0..{len(before) - 1}`; order 0 is the "before" of '
        "`align_recovery.md`) and the default (**now**)"
    )
    if extra:
        ways += (
            f", and the default with more starts ({', '.join(lab[5:] for lab in extra)}: "
            "construction from the inputs and from the outputs, then random elements, kept by "
            "objective)"
        )
    lines = [
        "# Does the weight-matching objective order barriers? "
        "(`python benchmarks/align_recovery.py --optima`)",
        "",
        f"{n} ReLU MLPs 3x512 and {n} small CNNs trained on digits (the main job's recipe, "
        f"seeds 0-{n - 1}), {n_pairs} pairs each. Every pair is matched "
        f"{len(labels)} ways: {ways}. Barrier: test-loss barrier over 11 alphas; objective: "
        "`sum_t <a_t, (g·b)_t>`.",
        "",
        f"| model | method | barrier, {n_pairs} pairs (mean ± std) | "
        f"barrier, the pairs of networks 0-{min(n, 6) - 1} (the main job's 6) | "
        "objective (mean) |",
        "|---|---|---:|---:|---:|",
    ]

    def pick_best(r):  # the barrier of the pair's optimum of highest objective
        return max((r[lab]["objective"], r[lab]["barrier"]) for lab in labels)[1]

    corr, diffs = {}, []
    for kind in ("mlp", "cnn"):
        rs = [r for r in rows if r["optima"] == kind]
        main = [r for r in rs if max(r["pair"]) < 6]
        for lab in labels:
            bars = [r[lab]["barrier"] for r in rs]
            lines.append(
                f"| {kind} | {lab} | {statistics.fmean(bars):.4f} ± {statistics.stdev(bars):.4f} "
                f"| {statistics.fmean(r[lab]['barrier'] for r in main):.4f} | "
                f"{statistics.fmean(r[lab]['objective'] for r in rs):.3f} |"
            )
        if extra:
            bars = [pick_best(r) for r in rs]
            lines.append(
                f"| {kind} | highest objective of the {len(labels)} | {statistics.fmean(bars):.4f}"
                f" ± {statistics.stdev(bars):.4f} | "
                f"{statistics.fmean(pick_best(r) for r in main):.4f} | – |"
            )
        for lab in before:
            row = [kind, f"now − {lab[len('before, ') :]}"]
            for sample in (rs, main):
                d = [r["now"]["barrier"] - r[lab]["barrier"] for r in sample]
                se = statistics.stdev(d) / len(d) ** 0.5
                row.append(f"{statistics.fmean(d):+.4f} ± {se:.4f}")
            diffs.append(row)
        cs, spans, best = [], [], []
        for r in rs:
            obj = np.array([r[lab]["objective"] for lab in labels])
            bar = np.array([r[lab]["barrier"] for lab in labels])
            spans.append(bar.max() - bar.min())
            best.append(bar[obj.argmax()] <= bar.min() + 1e-12)
            if obj.std() > 0 and bar.std() > 0:
                cs.append(float(np.corrcoef(obj, bar)[0, 1]))
        corr[kind] = (statistics.fmean(cs), len(cs), statistics.fmean(spans), sum(best), len(rs))
    lines += [
        "",
        "Paired differences in barrier, the default minus the previous loop, mean ± standard "
        "error over the pairs (negative: lower now):",
        "",
        f"| model | difference | {n_pairs} pairs | the main job's 15 pairs |",
        "|---|---|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in diffs),
        "",
        "Within each pair, across its optima:",
        "",
        "| model | correlation of objective and barrier (mean over pairs) | barrier range "
        "(max - min, mean over pairs) | pairs whose highest objective has the lowest barrier "
        f"(chance: 1 in {len(labels)}) |",
        "|---|---:|---:|---:|",
    ]
    for kind, (c, m, span, hit, tot) in corr.items():
        lines.append(f"| {kind} | {c:+.2f} ({m} pairs) | {span:.4f} | {hit}/{tot} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def fmean(r, key):  # a pair's mean over its optima
            return statistics.fmean(r[lab][key] for lab in labels)

        colour = {lab: "tab:blue" for lab in before} | {lab: "tab:green" for lab in extra}
        colour["now"] = "tab:red"
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, kind in zip(axes, ("mlp", "cnn")):
            rs = [r for r in rows if r["optima"] == kind]
            for group in (before, extra, ["now"]):  # the default drawn last, on top
                for lab in group:
                    ax.scatter(
                        [r[lab]["objective"] - fmean(r, "objective") for r in rs],
                        [r[lab]["barrier"] - fmean(r, "barrier") for r in rs],
                        s=8,
                        c=colour[lab],
                    )
            ax.set_title(f"{kind}: one pair's optima")
            ax.set_xlabel("objective - pair mean")
            ax.set_ylabel("barrier - pair mean")
            ax.title.set_fontsize(8)
        more = ", green: more starts" if extra else ""
        fig.suptitle(f"blue: previous loop's orders, red: now{more}", fontsize=9)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
        lines += ["", f"![objective vs barrier]({plot.name})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- report
FINDINGS = """
## What defeated the previous loop

From the identity, a group's step reads every tensor it touches with the neighbouring
groups at their current, arbitrary permutation: through those tensors the inner products
are noise. A freshly built network has no other clue (norms 1 and 0, zero biases), and its
tensors are at very different scales. In EfficientNet-B0 (kaiming fan-out init) the
squeeze-excitation convs (fan-out 4-48: std 0.2-0.7) and the 1x1 projections (std
0.08-0.35) are several times the stem conv (std 0.08 over 27 inputs). For the stem's 32
channels the signal on the diagonal of the cost matrix is about 27·0.083² + 9·0.083² ≈
0.25 (stem conv and depthwise kernel), the noise through the unsolved gate (fc1, fc2) and
projection about 0.9 per entry: even in input-to-output order the very first step goes
wrong (3 of 32 channels right), and the later steps build on it.

The depthwise convolution is not the obstacle: the converter stores it as it is,
``(C, 1, k, k)``, a block diagonal whose input axis is the channel's own (size 1, fixed),
so its kernel is a per-channel clue for its group and ties nothing. Nor is a gate as
such: once its input group is solved, the squeeze group is solved exactly from fc1.

The fix is the construction (``tasks/align/__init__.py``, ``_Matcher.construct``): every group is
solved once, in input-to-output order, from the tensors whose other groups are fixed or
already solved, so no step reads a neighbour that is still wrong. A relabelled copy is
then recovered in one pass; sweeps in the same order, a second start built from the
outputs (skipped when the first is within 0.1% of the Cauchy-Schwarz bound
``sum_v |a_v| |b_v|``, as a recovered copy is), keep-the-best and a relative tolerance
follow. ``schedule="random"`` keeps the previous loop.

rebasin traces the model with torchview and matches the permutations it derives from the
graph. Where it ran it kept the function (output change ~1e-7) except on the two
squeeze-excitation networks, whose outputs it changed by 90-150%: the gate's
multiplication is not handled, so its permutations do not describe a symmetry there;
everywhere it ended near the unaligned distance. On ConvNeXt-T it fails on the custom
``LayerNorm2d`` module (torchvision's own class, written here by hand).
"""


def report(models: list[dict], pairs: list[dict], args) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Weight matching on relabelled noisy copies (`python benchmarks/align_recovery.py`)",
        "",
        f"torch {torch.__version__}, {os.cpu_count()} cores (shared with other jobs: compare "
        f"times within a row), 1 torch thread; load average when written {load:.1f}. Weights as torchvision's constructor leaves them "
        "(`tests.fixtures.large.torchvision_init`), float32; b = a relabelled by "
        "`space.random_element()` plus Gaussian noise of 1% of each tensor's std (seed "
        f'{args.seed}). **Before**: `schedule="random"` (the previous loop: identity start, '
        "random order, stop at the first sweep without gain). **Now**: the default (order "
        "from the structure, construction from the inputs and from the outputs, kept by "
        "objective, relative tolerance). Distance: `|g·b - a|` over the matched tensors; "
        "the true inverse leaves the noise. rebasin: `PermutationCoordinateDescent` "
        "(PyPI `rebasin`, own environment), same pair.",
        "",
        "| model | params | groups | recovered before | recovered now | distance: unaligned | "
        "before | now | true inverse | time before (s) | time now (s) | "
        "rebasin distance | rebasin time (s) | rebasin: output change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for m in models:
        if "error" in m:
            lines.append(f"| {LABELS[m['name']]} | – | – | {m['error']} |" + " – |" * 10)
            continue
        rb = m.get("rebasin")
        if rb is None:
            rb_cells = "not run | – | – |"
        elif "error" in rb:
            rb_cells = "failed¹ | – | – |"
            notes.append(f"{LABELS[m['name']]}: {rb['error']}")
        else:
            change = "n/a²" if rb["preserved"] is None else f"{rb['preserved']:.1e}"
            rb_cells = f"{rb['dist']:.3f} | {rb['s']:.2f} | {change} |"
        bf, nw = m["before"], m["now"]
        lines.append(
            f"| {LABELS[m['name']]} | {m['params']:,} | {m['groups']} | {bf['ok']}/{m['groups']} "
            f"| {nw['ok']}/{m['groups']} | {m['naive_dist']:.3f} | {bf['dist']:.3f} | "
            f"{nw['dist']:.3f} | "
            f"{m['true_dist']:.3f} | {bf['s']:.2f} | {nw['s']:.2f} | {rb_cells}"
        )
    if notes:
        lines += ["", "¹ rebasin's error (last line):", ""]
        lines += [f"* {n}" for n in notes]
    if any((m.get("rebasin") or {}).get("preserved", 0) is None for m in models):
        lines += [
            "",
            "² torchvision's ViT starts with a zero classification head: its output is 0 "
            "whatever the permutation, so the output check says nothing there.",
        ]
    lines += ["", FINDINGS.strip()]
    if pairs:
        n = 1 + max(max(r["pair"]) for r in pairs)
        lines += [
            "",
            "## Trained pairs ("
            + (
                "the main job's: `examples/align_and_merge.py`)"
                if n == 6
                else f"{n} networks per model: `--pair-models {n}`)"
            ),
            "",
            f"{n} ReLU MLPs 3x512 and {n} small CNNs trained on digits (15 epochs, seeds "
            f"0-{n - 1}), {n * (n - 1) // 2} pairs each; matching time best of {args.repeats}, "
            "before and now "
            "interleaved, one thread. Barrier: test-loss barrier over 11 alphas.",
            "",
            "| model | method | barrier (mean ± std) | objective (mean) | sweeps (mean) | "
            "time (s, mean) | time now / before |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for kind in ("mlp", "cnn"):
            rows = [r for r in pairs if r["kind"] == kind]
            mean_s = {lab: statistics.fmean(r[lab]["s"] for r in rows) for lab in ("before", "now")}
            for lab in ("before", "now"):
                bars = [r[lab]["barrier"] for r in rows]
                ratio = "" if lab == "before" else f"{mean_s['now'] / mean_s['before']:.2f}×"
                lines.append(
                    f"| {kind} | {lab} | {statistics.fmean(bars):.4f} ± "
                    f"{statistics.stdev(bars):.4f} | "
                    f"{statistics.fmean(r[lab]['objective'] for r in rows):.3f} | "
                    f"{statistics.fmean(r[lab]['sweeps'] for r in rows):.1f} | "
                    f"{mean_s[lab]:.3f} | {ratio} |"
                )
            lower = sum(r["now"]["barrier"] <= r["before"]["barrier"] for r in rows)
            higher = sum(r["now"]["objective"] >= r["before"]["objective"] for r in rows)
            lines.append(
                f"| {kind} | pairs where now ≤ before | barrier {lower}/{len(rows)} | "
                f"objective ≥: {higher}/{len(rows)} | | | |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=LARGE_MODELS + SMALL_MODELS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebasin-python", default="/work/venv-rebasin/bin/python")
    ap.add_argument("--no-rebasin", action="store_true")
    ap.add_argument("--rebasin-timeout", type=float, default=900)
    ap.add_argument("--no-pairs", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--pair-models", type=int, default=6, help="networks per model (6: the main job's)"
    )
    ap.add_argument("--optima", action="store_true", help="only the trained pairs' optima")
    ap.add_argument("--before-seeds", type=int, default=3, help="previous loop's orders")
    ap.add_argument(
        "--extra-starts",
        type=int,
        default=0,
        help="--optima: also the default with restarts=3, 4, ... (this many runs)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="default: results/align_recovery.md (align_optima.md with --optima)",
    )
    ap.add_argument("--report-from", help="render the report from a run's stderr (its JSON lines)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rebasin-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rebasin_worker:
        rebasin_worker(*args.rebasin_worker)
        return
    if args.out is None:
        args.out = str(RESULTS / ("align_optima.md" if args.optima else "align_recovery.md"))
    if args.optima:
        if args.report_from:
            rows = [json.loads(ln) for ln in open(args.report_from) if ln.startswith("{")]
        else:
            rows = optima(args.pair_models, args.before_seeds, args.extra_starts)
        text = optima_report(rows, Path(args.out).with_suffix(".png"))
        Path(args.out).write_text(text)
        print(text)
        return
    if args.report_from:
        rows = [json.loads(ln) for ln in open(args.report_from) if ln.startswith("{")]
        models = [r for r in rows if "name" in r]
        pairs = [r for r in rows if "kind" in r]
        text = report(models, pairs, args)
        Path(args.out).write_text(text)
        print(text)
        return
    rebasin = None if args.no_rebasin else args.rebasin_python
    if rebasin and not Path(rebasin).exists():
        print(f"{rebasin}: not found, rebasin not run", file=sys.stderr)
        rebasin = None
    if args.worker:
        print(json.dumps(worker(args.worker, args.seed, rebasin, args.rebasin_timeout)))
        return
    models = []
    for name in args.models:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", name, "--seed", str(args.seed)]
        cmd += ["--rebasin-timeout", str(args.rebasin_timeout)]
        cmd += ["--no-rebasin"] if rebasin is None else ["--rebasin-python", rebasin]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            models.append({"name": name, "error": err[-1] if err else "failed"})
        else:
            models.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(models[-1]), file=sys.stderr, flush=True)
    pairs = [] if args.no_pairs else trained_pairs(args.repeats, args.pair_models)
    text = report(models, pairs, args)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
