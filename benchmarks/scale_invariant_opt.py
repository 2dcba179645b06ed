"""Radial projection on norm-scale-invariant weights: ``NormProjected`` vs ``adamp``.

A BatchNorm CNN on scikit-learn's 8×8 digits (``tasks.datasets.digits.small_cnn(16, norm="batch")``:
three 3×3 conv → BN → ReLU layers of 16/32/32 channels, global pool, linear head;
1,347 train / 450 test), cross-entropy, minibatches of 64, ``--epochs`` epochs, no weight
decay. Six optimizers, each from the same initialization and minibatch order per seed:

* ``SGD`` (momentum 0.9, Nesterov) and ``Adam``: the plain optimizers;
* ``SGDP`` / ``AdamP`` from PyPI's ``adamp`` (Heo et al., ICLR 2021; same
  hyperparameters, their default ``delta=0.1``): the radial part of the update is removed
  on weights whose gradient looks orthogonal to them (a cosine test, per channel or layer);
* ``SGD+proj`` / ``Adam+proj``: ``tasks.optim.scale_invariant.NormProjected`` around the plain
  optimizer: the same projection, exactly on the conv channels the WeightSpace knows are
  followed by BatchNorm (``space.norm_scales``), no test.

Reported: final full-training-set loss and test accuracy (mean ± std over seeds), the
growth of the invariant weights' norm (mean over conv channels of ``|w_end| / |w_start|``:
a larger norm is a smaller effective step), and wall time per run. ``adamp`` is a
benchmark-only dependency (``pip install adamp``), not one of metanet's.

    python benchmarks/scale_invariant_opt.py            # 3 seeds, 30 epochs: ~12 minutes
    python benchmarks/scale_invariant_opt.py --quick    # 2 seeds, 10 epochs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from converters import from_module  # noqa: E402
from tasks.datasets import digits  # noqa: E402
from tasks.optim.scale_invariant import NormProjected  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LR = {"sgd": 0.03, "adam": 3e-3}


def _optimizer(kind: str, model: nn.Module, space):
    import adamp

    params = model.parameters()
    if kind == "SGD":
        return torch.optim.SGD(params, lr=LR["sgd"], momentum=0.9, nesterov=True)
    if kind == "SGDP":
        return adamp.SGDP(params, lr=LR["sgd"], momentum=0.9, nesterov=True)
    if kind == "SGD+proj":
        inner = torch.optim.SGD(params, lr=LR["sgd"], momentum=0.9, nesterov=True)
        return NormProjected(inner, model, space)
    if kind == "Adam":
        return torch.optim.Adam(params, lr=LR["adam"])
    if kind == "AdamP":
        return adamp.AdamP(params, lr=LR["adam"])
    if kind == "Adam+proj":
        return NormProjected(torch.optim.Adam(params, lr=LR["adam"]), model, space)
    raise ValueError(kind)


def _conv_norms(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            m.weight.detach().flatten(1).norm(dim=1)
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        ]
    )


def run(kind: str, seed: int, data: digits.Digits, epochs: int) -> dict:
    torch.manual_seed(seed)
    model = digits.small_cnn(16, norm="batch")
    space = from_module(model, (data.x_train[:4],))
    opt = _optimizer(kind, model, space)
    start = _conv_norms(model)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(data.x_train), data.y_train))
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    growth = float((_conv_norms(model) / start).mean())
    return {"loss": train_loss, "acc": acc, "growth": growth, "wall": wall}


def _ms(xs: list[float], fmt: str) -> str:
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 10 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 2, 10
    torch.set_num_threads(1)
    data = digits.load()
    kinds = ["SGD", "SGDP", "SGD+proj", "Adam", "AdamP", "Adam+proj"]
    res: dict[str, list[dict]] = {k: [] for k in kinds}
    for seed in range(args.seeds):
        for k in kinds:
            res[k].append(run(k, seed, data, args.epochs))
            r = res[k][-1]
            print(
                f"seed {seed} {k:<10} loss {r['loss']:.4f} acc {r['acc']:.4f} "
                f"norm x{r['growth']:.3f} {r['wall']:.1f}s",
                flush=True,
            )
    lines = [
        f"BN CNN on digits (small_cnn(16, norm='batch')), {args.epochs} epochs, batch 64, "
        f"{args.seeds} seeds, SGD lr {LR['sgd']} (momentum 0.9, Nesterov), Adam lr {LR['adam']}, "
        "no weight decay, 1 thread.",
        "",
        "| optimizer | final train loss | test accuracy | conv channel norm growth | s / run |",
        "|---|---|---|---|---|",
    ]
    for k in kinds:
        rs = res[k]
        lines.append(
            f"| {k} | {_ms([r['loss'] for r in rs], '.4f')} | "
            f"{_ms([100 * r['acc'] for r in rs], '.2f')}% | "
            f"×{statistics.fmean(r['growth'] for r in rs):.3f} | "
            f"{statistics.fmean(r['wall'] for r in rs):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".scale_invariant_opt.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, RESULTS / "scale_invariant_opt.md")


if __name__ == "__main__":
    main()
