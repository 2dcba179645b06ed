"""Align and merge networks trained from different seeds on scikit-learn's digits.

Trains ``--models`` ReLU MLPs (3 × 512) and as many small CNNs, each from its own seed,
then for every pair of them: the loss barrier of naive interpolation, and after Git
Re-Basin weight matching, activation matching and (MLPs) the straight-through estimator.
Prints one row per model and method, the mean ± standard deviation over the pairs; saves
the barrier plot (mean curves with their spread), the first pair's checkpoints and its b
aligned by weight matching (every aligned b is verified function-identical first).

Why a mean over pairs: one pair's barrier after matching is a fragile number. The
networks a CPU trains depend on its kernels (AVX2 and AVX-512 round sums differently),
and weight matching can land in another local optimum for a change in the last bit of a
weight: one pair moved from 0.684 to 0.371 between two machines. The mean over all
``models · (models - 1) / 2`` pairs moves far less, and README states the band that CI
accepts around it (``.ci/readme_table.py``). One torch thread keeps a run repeatable on
one machine.

    python examples/align_and_merge.py --out align_out
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

import metanet
from converters import from_module
from tasks.align import activation_matching, ste_matching, verify_aligned, weight_matching
from tasks.datasets import digits
from tasks.merge import Barrier, evaluator, loss_barrier, plot_barriers


def compare(kind, model_a, model_b, d, ste_epochs: int, alphas: int, save: Path | None) -> list:
    """Naive vs aligned interpolation of one pair: rows of (method, curve, seconds).

    With ``save``, both checkpoints and b aligned by weight matching are written there.
    """
    a, b = model_a.state_dict(), model_b.state_dict()
    space = from_module(model_a, d.x_train[:2])
    if save is not None:
        metanet.save(save / f"{kind}_a.safetensors", a, space)  # for the CLI: metanet align ...
        metanet.save(save / f"{kind}_b.safetensors", b, space)
    test = evaluator(model_a, digits.batches(d.x_test, d.y_test), accuracy=True)
    train = digits.batches(d.x_train, d.y_train, 128)
    methods = {
        "naive": lambda: space.identity(),
        "weight matching": lambda: weight_matching(space, a, b),
        "activation matching": lambda: activation_matching(model_a, model_b, space, train),
    }
    if kind == "mlp" and ste_epochs:
        methods["STE"] = lambda: ste_matching(model_a, space, a, b, train, epochs=ste_epochs)
    rows = []
    for name, method in methods.items():
        start = time.perf_counter()
        g = method()
        seconds = time.perf_counter() - start
        aligned = space.apply(b, g)
        # the aligned b must be b, relabelled: checked before anything uses it
        verify_aligned(model_b, b, aligned, d.x_test[:64])
        rows.append((name, loss_barrier(test, a, aligned, alphas=alphas), seconds))
        if name == "weight matching" and save is not None:
            metanet.save(save / f"{kind}_b_aligned.safetensors", aligned, space)
    return rows


def _mean_std(values: list[float], digits_: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits_}f} ± {std:.{digits_}f}"


def run(
    out: Path, models: int = 6, epochs: int = 15, ste_epochs: int = 2, alphas: int = 11
) -> dict[str, list[Barrier]]:
    """Train, align and merge; print the table. Returns ``"kind: method" -> curves``."""
    if models < 2:
        raise ValueError(f"--models must be at least 2 (it makes pairs), got {models}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # repeatable on one machine; restored for in-process callers
    try:
        return _run(out, models, epochs, ste_epochs, alphas)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, n_models: int, epochs: int, ste_epochs: int, alphas: int):
    out.mkdir(parents=True, exist_ok=True)
    data = digits.load()
    curves: dict[str, list[Barrier]] = {}
    seconds: dict[str, list[float]] = {}
    for kind in ("mlp", "cnn"):
        d = data.flat() if kind == "mlp" else data
        models = digits.main_job_models(kind, d, n_models, epochs=epochs)
        for i, j in itertools.combinations(range(n_models), 2):
            save = out if (i, j) == (0, 1) else None
            for name, curve, sec in compare(
                kind, models[i], models[j], d, ste_epochs, alphas, save
            ):
                curves.setdefault(f"{kind}: {name}", []).append(curve)
                seconds.setdefault(f"{kind}: {name}", []).append(sec)

    pairs = n_models * (n_models - 1) // 2
    print(f"mean ± std over {pairs} pairs of {n_models} networks per model:")
    print("| model | method | barrier | midpoint acc. | time (s) |")
    print("|---|---|---:|---:|---:|")
    for label, cs in curves.items():
        kind, name = label.split(": ")
        barrier = _mean_std([c.barrier for c in cs])
        mid = _mean_std([c.extra["metric1"][len(c.alphas) // 2] for c in cs])
        secs = "–" if name == "naive" else f"{statistics.fmean(seconds[label]):.2f}"
        print(f"| {kind} | {name} | {barrier} | {mid} | {secs} |")
    plot_barriers(curves, out / "barriers.png", title="digits")
    print(f"wrote {out / 'barriers.png'} and the first pair's checkpoints in {out}")
    return curves


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default="align_out", help="folder for the plot and checkpoints")
    parser.add_argument("--models", type=int, default=6, help="networks per model (all pairs)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per model")
    parser.add_argument("--ste-epochs", type=int, default=2, help="STE epochs (0 skips it)")
    args = parser.parse_args(argv)
    if args.models < 2:
        parser.error(f"--models must be at least 2 (it makes pairs), got {args.models}")
    run(Path(args.out), args.models, args.epochs, args.ste_epochs)


if __name__ == "__main__":
    main()
