"""Learned optimizers vs tuned Adam and SGD with momentum, on held-out tasks.

For each task family (MLP, small CNN, character LM; see ``tasks.optim.learned_opt.families``):

1. meta-train three learned optimizers with truncated backpropagation on tasks of the
   family's training widths: the per-parameter MLP (DeepSet-style), UNF and GMN update
   rules, the same number of meta-steps each (checkpointed under ``--work``: a rerun
   resumes);
2. held-out tasks: ``--tasks`` new seeds at the training widths, and as many at a width
   meta-training never saw;
3. Adam and SGD with momentum 0.9 get their learning rate tuned by a grid *on those
   held-out tasks* (the best final loss; this favours the baselines);
4. every optimizer trains every held-out task for K = the meta-training horizon steps
   from the same init on the same batches; the table gives the loss on the task's whole
   training set after K steps, mean ± std over tasks, and the plot the mean minibatch
   loss curves.

    python benchmarks/learned_opt.py [--families mlp,cnn,lm] [--meta-steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from metanet.io import atomic_write
from tasks.optim.learned_opt import (
    GMNUpdate,
    PerParameterMLP,
    UNFUpdate,
    UpdateRule,
    family,
    meta_train,
    train_curve,
    tune_lr,
)

ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SGDM_GRID = (1e-2, 3e-2, 1e-1, 3e-1, 1.0)
NETS = {
    "per-parameter LO": lambda space: PerParameterMLP(),
    "UNF LO": lambda space: UNFUpdate(space),
    "GMN LO": lambda space: GMNUpdate(space),
}


def _adam(named, lr):
    return torch.optim.Adam([p for _, p in named], lr=lr)


def _sgdm(named, lr):
    return torch.optim.SGD([p for _, p in named], lr=lr, momentum=0.9)


def _stats(xs):
    finite = [x for x in xs if x == x and x != float("inf")]
    if len(finite) < len(xs):
        return f"diverged on {len(xs) - len(finite)}/{len(xs)}"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def run_family(name, args, work: Path):
    fam = family(name)
    rows, curves, meta_info = {}, {}, {}
    rules = {}
    for label, make in NETS.items():
        torch.manual_seed(args.seed)
        rule = UpdateRule(make(fam.task(0).space))
        ckpt = work / f"{name}-{label.split()[0]}.safetensors"
        t0 = time.perf_counter()
        res = meta_train(
            rule, fam, steps=args.meta_steps, unroll_steps=args.unroll, horizon=args.horizon,
            tasks=args.meta_tasks, lr=args.meta_lr, seed=args.seed, checkpoint=ckpt,
            every=25, progress=not args.quiet,
        )  # fmt: skip
        secs = time.perf_counter() - t0
        last = [r["meta_loss"] for r in res.history[-20:]]
        meta_info[label] = {
            "seconds_this_run": round(secs, 1),
            "resumed_from": res.resumed_from,
            "final_meta_loss": statistics.mean(last),
            "alpha": rule.alpha,
            "beta": rule.beta,
        }
        rules[label] = rule
    splits = {
        f"widths {'/'.join(map(str, fam.widths))}": [
            fam.task(900_000 + i) for i in range(args.tasks)
        ],
        f"unseen width {fam.held_out_width}": [
            fam.task(900_000 + i, fam.held_out_width) for i in range(args.tasks)
        ],
    }
    K = args.horizon
    for split, tasks in splits.items():
        a_lr, a_scores = tune_lr(tasks, _adam, ADAM_GRID, K)
        s_lr, s_scores = tune_lr(tasks, _sgdm, SGDM_GRID, K)
        methods = {
            f"Adam (lr {a_lr:g}, tuned)": lambda named, lr=a_lr: _adam(named, lr),
            f"SGDM (lr {s_lr:g}, tuned)": lambda named, lr=s_lr: _sgdm(named, lr),
            **rules,
        }
        for label, opt in methods.items():
            t0 = time.perf_counter()
            cs = [train_curve(t, opt, K, full=True) for t in tasks]
            secs = (time.perf_counter() - t0) / len(tasks)
            rows[(split, label)] = ([c[-1] for c in cs], secs)
            curves[(split, label)] = [statistics.mean(c[i] for c in cs) for i in range(K)]
    return rows, curves, meta_info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="mlp,cnn,lm")
    ap.add_argument("--meta-steps", type=int, default=300)
    ap.add_argument("--horizon", type=int, default=100, help="K: inner steps per task")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--meta-tasks", type=int, default=2)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--tasks", type=int, default=5, help="held-out tasks per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/metanet_learned_opt", help="checkpoints")
    ap.add_argument("--out", default="benchmarks/results/learned_opt.md")
    ap.add_argument("--plot", default="benchmarks/results/learned_opt_curves.png")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; K = {args.horizon} "
        f"inner steps, {args.tasks} held-out tasks per row, {args.meta_steps} TBPTT "
        f"meta-steps per learned optimizer (unroll {args.unroll}, {args.meta_tasks} tasks)",
        "",
        "| family | held-out tasks | optimizer | training-set loss after K steps (mean ± std) | s / task |",
        "|---|---|---|---:|---:|",
    ]
    all_curves, all_meta = {}, {}
    for name in args.families.split(","):
        t0 = time.perf_counter()
        rows, curves, meta = run_family(name, args, work)
        all_meta[name] = {**meta, "family_seconds": round(time.perf_counter() - t0, 1)}
        for (split, label), (finals, secs) in rows.items():
            lines.append(f"| {name} | {split} | {label} | {_stats(finals)} | {secs:.2f} |")
        all_curves[name] = curves
        print("\n".join(lines), flush=True)
    lines += ["", "Meta-training:", "", "```", json.dumps(all_meta, indent=1), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    _plot(all_curves, args.plot)


def _plot(all_curves, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, s) for f, c in all_curves.items() for s in dict.fromkeys(k[0] for k in c)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (fam, split) in zip(axes[0], panels):
        for (s, label), ys in all_curves[fam].items():
            if s == split:
                ax.plot(ys, label=label, lw=1.4)
        ax.set_yscale("log")
        ax.set_title(f"{fam}: {split}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over tasks)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
