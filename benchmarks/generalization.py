"""Generalization prediction on the CNN zoo: Kendall τ of predicted vs true test accuracy.

The zoo is ``tasks.zoo.make_zoo``'s (made first if missing, about 1,000 CNNs): small CNNs
trained on scikit-learn's digits with varied recipes. Every model kind regresses each
CNN's test accuracy from its weights (MSE, ``tasks.train.train(target="accuracy")``) on the
same train split, several seeds, and is scored by Kendall τ on the test split. The table
(mean ± std over seeds, wall time per run) is written atomically to
``benchmarks/results/generalization.md``.

    python benchmarks/generalization.py               # ~1,000 CNNs, 3 seeds, 1 thread
    python benchmarks/generalization.py --n 40 --epochs 1 --seeds 1 --max-steps 20  # smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from metanet.io import atomic_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT / "out" / "cnn-zoo"
MODELS = ("statnn", "unf", "nfn-np", "nfn-hnp", "gmn", "flat")
NAMES = {
    "statnn": "StatNN",
    "unf": "UNF (metanet, full basis)",
    "nfn": "UNF (NFN basis)",
    "nfn-np": "NFN-NP (`nfn` package)",
    "nfn-hnp": "NFN-HNP (`nfn` package)",
    "gmn": "GMN (metanet)",
    "flat": "flat MLP (+ permutation augmentation)",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="zoo folder")
    ap.add_argument("--n", type=int, default=1000, help="CNNs, if the zoo must be made")
    ap.add_argument("--max-steps", type=int, default=None, help="cap (quick zoos only)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "generalization.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tasks.inr import WeightDataset
    from tasks.train import train
    from tasks.zoo import make_zoo

    made = ""
    if not (args.data / "dataset.json").exists() or _missing(args.data):
        t0 = time.perf_counter()
        make_zoo(args.data, args.n, seed=0, max_steps=args.max_steps, progress=False)
        made = f"; the zoo was made in this run ({time.perf_counter() - t0:.0f} s)"
    full = WeightDataset(args.data)
    accs = torch.tensor([r["accuracy"] for r in full.rows])
    counts = {s: sum(r["split"] == s for r in full.rows) for s in ("train", "val", "test")}

    results: dict[str, list] = {}
    for kind in args.models.split(","):
        for seed in range(args.seeds):
            r = train(
                kind,
                args.data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                hidden=args.hidden,
                seed=seed,
                schedule=args.schedule,
                target="accuracy",
                progress=False,
            )
            results.setdefault(kind, []).append(r)
            print(
                f"{kind} seed {seed}: test τ {r.test_kendall_tau:.3f} "
                f"(val {r.val_kendall_tau:.3f}), MSE {r.test_mse:.4f}, {r.seconds:.1f} s",
                flush=True,
            )

    def ms(xs: list[float]) -> str:  # NaN-tolerant (τ is NaN on a constant prediction)
        t = torch.tensor(xs, dtype=torch.float64)
        sd = float(t.std()) if len(xs) > 1 else 0.0
        return f"{float(t.mean()):.3f} ± {sd:.3f}"

    q = torch.quantile(accs.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).double())
    lines = [
        "# Generalization prediction on the CNN zoo (Kendall τ)",
        "",
        f"Zoo `{args.data.name}`: {len(full):,} CNNs (conv 1→8, conv 8→8 s2, avg pool, "
        f"linear 8→10; {sum(math.prod(t.shape) for t in full.space.tensors.values())} parameters) on "
        "scikit-learn digits with varied lr, init scale, weight decay, steps, batch size and "
        f"label noise; split {counts['train']:,} / {counts['val']:,} / {counts['test']:,}. "
        "Test accuracy of the CNNs: min / quartiles / max "
        + " / ".join(f"{v:.3f}" for v in q.tolist())
        + f"{made}.",
        "",
        f"Each model regresses test accuracy (MSE), {args.epochs} epochs, batch "
        f"{args.batch_size}, Adam {args.lr:g} ({args.schedule}), {args.hidden} channels, "
        f"{args.seeds} seed(s), {args.threads} thread(s). Kendall τ on the test split.",
        "",
        "| model | test Kendall τ | val Kendall τ | test MSE | wall time / run |",
        "|---|---:|---:|---:|---:|",
    ]

    def key(k: str) -> float:
        m = statistics.fmean(r.test_kendall_tau for r in results[k])
        return -m if m == m else math.inf

    order = sorted(results, key=key)
    for kind in order:
        rs = results[kind]
        lines.append(
            f"| {NAMES.get(kind, kind)} | {ms([r.test_kendall_tau for r in rs])} | "
            f"{ms([r.val_kendall_tau for r in rs])} | "
            f"{statistics.mean(r.test_mse for r in rs):.4f} | "
            f"{statistics.mean(r.seconds for r in rs):.1f} s |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {args.out}")
    return 0


def _missing(root: Path) -> bool:
    import json

    n = json.loads((root / "dataset.json").read_text())["num_shards"]
    return any(not (root / f"shard-{i:05d}-of-{n:05d}.safetensors").exists() for i in range(n))


if __name__ == "__main__":
    raise SystemExit(main())
