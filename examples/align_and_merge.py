"""Align and merge networks trained from different seeds on scikit-learn's digits.

Trains two ReLU MLPs (3 × 512) and two small CNNs with different seeds, then for each
pair: the loss barrier of naive interpolation, and after Git Re-Basin weight matching,
activation matching and (MLPs) the straight-through estimator. Prints the table, saves
the barrier plot, both checkpoints of each pair and b aligned by weight matching (verified
function-identical first).

The run is deterministic, with the same numbers on any x86-64 CPU with AVX2: one thread
(with more, the BLAS library may split sums differently from run to run when the machine
is busy), fixed seeds for training, data order and every matching, and one instruction
set whatever the CPU offers (ATen's and MKL's AVX2 code paths, MKL in its conditional
numerical reproducibility mode, convolutions off oneDNN, which picks kernels by CPU):
otherwise training on an AVX-512 machine ends elsewhere than on an AVX2 one, and with it
every barrier. (A CPU without AVX2 runs other code and may print other digits.)
README's table is this script's output; CI compares the two, all columns but the times.

    python examples/align_and_merge.py --out align_out
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

# Read when torch loads, so set before it is imported (see above; an importer that loaded
# torch already keeps its own settings).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("MKL_CBWR", "AVX2")

import torch  # noqa: E402

import metanet
from converters import from_module
from tasks import digits
from tasks.align import activation_matching, ste_matching, verify_aligned, weight_matching
from tasks.merge import evaluator, loss_barrier, plot_barriers


def compare(kind, model_a, model_b, d, out: Path, ste_epochs: int, alphas: int) -> list:
    """Naive vs aligned interpolation of one pair: rows of (method, curve, seconds)."""
    a, b = model_a.state_dict(), model_b.state_dict()
    space = from_module(model_a, d.x_train[:2])
    metanet.save(out / f"{kind}_a.safetensors", a, space)  # for the CLI: metanet align ...
    metanet.save(out / f"{kind}_b.safetensors", b, space)
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
        if name == "weight matching":
            metanet.save(out / f"{kind}_b_aligned.safetensors", aligned, space)
    return rows


def run(out: Path, epochs: int = 15, ste_epochs: int = 2, alphas: int = 11) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic (see above); restored for in-process callers
    try:
        with torch.backends.mkldnn.flags(enabled=False):  # oneDNN picks kernels by CPU
            return _run(out, epochs, ste_epochs, alphas)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, epochs: int, ste_epochs: int, alphas: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = digits.load()
    results = {}
    for kind in ("mlp", "cnn"):
        d = data.flat() if kind == "mlp" else data
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = digits.mlp(512, 3) if kind == "mlp" else digits.small_cnn(32)
            lr = 1e-3 if kind == "mlp" else 3e-3
            models.append(digits.train(model, d, epochs=epochs, lr=lr, batch_size=128, seed=seed))
        for name, curve, seconds in compare(kind, *models, d, out, ste_epochs, alphas):
            results[f"{kind}: {name}"] = (curve, seconds)

    print("| model | method | test loss a / b | barrier | midpoint acc. | time (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for label, (c, sec) in results.items():
        kind, name = label.split(": ")
        ends = f"{c.losses[0]:.3f} / {c.losses[-1]:.3f}"
        mid = c.extra["metric1"][len(c.alphas) // 2]
        secs = "–" if name == "naive" else f"{sec:.2f}"  # naive matches nothing
        print(f"| {kind} | {name} | {ends} | {c.barrier:.3f} | {mid:.3f} | {secs} |")
    plot_barriers({k: c for k, (c, _) in results.items()}, out / "barriers.png", title="digits")
    print(f"wrote {out / 'barriers.png'} and the aligned checkpoints in {out}")
    return {k: c for k, (c, _) in results.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default="align_out", help="folder for the plot and checkpoints")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per model")
    parser.add_argument("--ste-epochs", type=int, default=2, help="STE epochs (0 skips it)")
    args = parser.parse_args(argv)
    run(Path(args.out), args.epochs, args.ste_epochs)


if __name__ == "__main__":
    main()
