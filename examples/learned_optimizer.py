"""Meta-train a UNF learned optimizer on digits MLPs, then train fresh networks with it.

    python examples/learned_optimizer.py --out lo_out            # ~9 min on 2 busy cores
    python examples/learned_optimizer.py --out lo_out --steps 800  # longer; resumes

1. Meta-training: truncated backpropagation through 20-step unrolls of 100-step runs on
   MLPs of width 16 or 32 with random seeds (``tasks.optim.learned_opt.meta_train``), checkpointed
   to ``OUT/unf_lo.safetensors``: stop it any time, and the same command resumes.
2. Fresh networks (new seeds, and the unseen width 48) are trained for 100 steps by the
   learned optimizer, a plain ``torch.optim`` optimizer like any other, and by Adam with
   the best learning rate of a small grid on the same networks.
3. A table of final training losses, and ``OUT/learned_optimizer.png`` with the curves.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from converters import from_module
from metanet.io import atomic_write
from tasks.optim.learned_opt import (
    LearnedOptimizer,
    UNFUpdate,
    UpdateRule,
    family,
    meta_train,
    train_curve,
    tune_lr,
)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="lo_out")
    ap.add_argument("--steps", type=int, default=400, help="meta-training steps")
    ap.add_argument("--horizon", type=int, default=100, help="inner steps per network")
    ap.add_argument("--tasks", type=int, default=5, help="fresh networks per width")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fam = family("mlp")
    torch.manual_seed(0)
    rule = UpdateRule(UNFUpdate(fam.task(0).space))
    res = meta_train(
        rule, fam, steps=args.steps, horizon=args.horizon, checkpoint=out / "unf_lo.safetensors",
        progress=not args.quiet,
    )  # fmt: skip
    if res.resumed_from:
        print(f"resumed from meta-step {res.resumed_from}")
    print(f"meta-trained {args.steps} steps: alpha={rule.alpha:.3f} beta={rule.beta:.4f}")

    # the learned optimizer is a torch.optim.Optimizer: use it like Adam on your own model
    x, y = fam.task(0).x, fam.task(0).y
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
        torch.nn.Linear(40, 10),
    )  # fmt: skip
    space = from_module(model, (x[:2],))
    opt = LearnedOptimizer(model.named_parameters(), rule, space=space)
    for step in range(args.horizon):
        i = torch.randint(len(y), (128,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(
        f"your own width-40 MLP, {args.horizon} steps with the learned optimizer: loss {loss.item():.4f}"
    )

    results, curves = {}, {}
    for width in (*fam.widths, fam.held_out_width):
        tasks = [fam.task(700_000 + i, width) for i in range(args.tasks)]
        lr, _ = tune_lr(
            tasks,
            lambda named, lr: torch.optim.Adam([p for _, p in named], lr=lr),
            (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
            args.horizon,
        )
        adam = [
            train_curve(
                t,
                lambda named, lr=lr: torch.optim.Adam([p for _, p in named], lr=lr),
                args.horizon,
                full=True,
            )
            for t in tasks
        ]
        ours = [train_curve(t, rule, args.horizon, full=True) for t in tasks]
        seen = "" if width in fam.widths else " (unseen)"
        for label, cs in ((f"Adam lr={lr:g}", adam), ("UNF learned", ours)):
            finals = [c[-1] for c in cs]
            results[(width, label)] = statistics.mean(finals)
            curves[(f"width {width}{seen}", label)] = [
                statistics.mean(c[i] for c in cs) for i in range(args.horizon)
            ]
            print(
                f"width {width:3d}{seen:9s} {label:14s} training-set loss after the run "
                f"{statistics.mean(finals):.4f} ± {statistics.pstdev(finals):.4f}"
            )
    _plot(curves, [r["meta_loss"] for r in res.history], out / "learned_optimizer.png")
    print(f"wrote {out / 'learned_optimizer.png'}")
    return results


def _plot(curves, meta_losses, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(k[0] for k in curves))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * len(panels) + 4, 3.2), squeeze=False)
    meta_ax = axes[0][-1]
    meta_ax.plot(meta_losses, lw=0.8, alpha=0.5, label="per meta-step")
    smooth = [sum(meta_losses[max(0, i - 19) : i + 1]) / len(meta_losses[max(0, i - 19) : i + 1])
              for i in range(len(meta_losses))]  # fmt: skip
    meta_ax.plot(smooth, label="mean of last 20")
    meta_ax.set_title("meta-loss (mean log training loss)")
    meta_ax.set_xlabel("meta-step")
    meta_ax.grid(alpha=0.3)
    meta_ax.legend()
    for ax, panel in zip(axes[0], panels):
        for (p, label), ys in curves.items():
            if p == panel:
                ax.plot(ys, label=label)
        ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


if __name__ == "__main__":
    main()
