"""Symmetry teleportation on scikit-learn's digits: training loss with and without it.

A ReLU MLP trained with SGD; every 25 steps of the first 250, ``Teleport`` moves the
weights along their positive-scaling symmetry (found and verified from the WeightSpace)
to a point with the same loss and a larger gradient. Saves the loss curves.

    python examples/teleport.py --out teleport_out          # a few seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from converters import from_module
from metanet.io import atomic_write
from tasks.datasets import digits
from tasks.optim.teleport import Teleport


def train(d, teleporting: bool, steps: int = 1500, seed: int = 0, lr: float = 0.05):
    torch.manual_seed(seed)
    model = digits.mlp(32, 3)
    space = from_module(model, d.x_train[:2])
    opt = Teleport(
        torch.optim.SGD(model.parameters(), lr=lr),
        model,
        space,
        every=25 if teleporting else 0,
        steps=10,
        lr=0.1,
        max_ratio=1.5,  # each teleport at most raises the squared gradient norm 1.5×
    )
    gen = torch.Generator().manual_seed(seed)  # the same minibatches with and without
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(d.y_train), (64,), generator=gen)
        x, y = d.x_train[idx], d.y_train[idx]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step((x, y) if step <= 250 else None)
        if step % 10 == 0:
            with torch.no_grad():
                curve.append(
                    (step, float(nn.functional.cross_entropy(model(d.x_train), d.y_train)))
                )
    with torch.no_grad():
        acc = float((model(d.x_test).argmax(1) == d.y_test).float().mean())
    return curve, acc, opt.log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="teleport_out")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = digits.load().flat()
    runs = {
        name: train(d, tele, args.steps)
        for name, tele in (("SGD", False), ("SGD + teleport", True))
    }
    for name, (curve, acc, log) in runs.items():
        reached = next((s for s, lo in curve if lo <= 0.05), None)
        print(
            f"{name:16s} train loss {curve[-1][1]:.4f}  test acc {acc:.3f}  "
            f"steps to loss 0.05: {reached or 'not reached'}  teleports: {len(log)}"
        )
    for entry in runs["SGD + teleport"][2][:3]:
        print(
            f"  step {entry['step']}: loss {entry['loss_before']:.4f} -> {entry['loss_after']:.4f}, "
            f"|grad|² {entry['objective_before']:.3f} -> {entry['objective_after']:.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, (curve, _, _) in runs.items():
        ax.plot(*zip(*curve), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("training loss (full set)")
    ax.set_title("digits MLP: symmetry teleportation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "teleport.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    print(f"wrote {out / 'teleport.png'}")


if __name__ == "__main__":
    main()
