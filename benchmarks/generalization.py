"""Generalization prediction on CNN zoos: Kendall τ of predicted vs true test accuracy.

The zoo is ``tasks.zoo.make_varied_zoo``'s (made first if missing): four CNN families on
scikit-learn's digits (depth 2–3, width 6–12, ReLU/tanh/GELU drawn per model), 1,250 CNNs
each with varied training recipes; ``--zoo base`` uses the original one-architecture zoo
(``tasks.zoo.make_zoo``). Every predictor (``tasks.generalization.fit``: MSE on the
recorded test accuracy, Adam + cosine, early stopping on validation τ) is trained on each
family's train split for several seeds and scored by Kendall τ on its test split. Tables:
per family, and the mean over families (mean ± std over seeds), with wall time per run;
the verdict lines name the predictors that beat StatNN by ≥ 0.02 τ and ``nfn``'s best.
``--mixed`` adds one GMN trained on all families at once (``tasks.mixed_zoo``), with the
ResNet-like and ViT-like families of ``--mixed-data`` if present. Written atomically to
``benchmarks/results/generalization.md``.

    python benchmarks/generalization.py --mixed         # the README table (~1.5 h, 1 thread)
    python benchmarks/generalization.py --n 40 --epochs 1 --seeds 1 --max-steps 20  # smoke
"""

from __future__ import annotations

import argparse
import json
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
DEFAULT_DATA = ROOT / "out" / "cnn-zoo-varied"
DEFAULT_MIXED = ROOT / "out" / "mixed-zoo"
MODELS = (
    "statnn",
    "flat",
    "unf",
    "nfn-np",
    "nfn-hnp",
    "gmn",
    "unf+stats",
    "nfn-hnp+stats",
    "none+stats+probe",
    "unf+stats+probe",
)
NAMES = {
    "statnn": "StatNN",
    "flat": "flat MLP",
    "unf": "UNF (metanet, full basis)",
    "nfn": "UNF (NFN basis)",
    "nfn-np": "NFN-NP (`nfn` package)",
    "nfn-hnp": "NFN-HNP (`nfn` package)",
    "gmn": "GMN (metanet)",
    "unf+stats": "UNF + weight statistics",
    "nfn-hnp+stats": "NFN-HNP + weight statistics",
    "gmn+stats": "GMN + weight statistics",
    "none+stats+probe": "weight statistics + probe features",
    "unf+stats+probe": "UNF + weight statistics + probe features",
}


def _families(data: Path) -> list[Path]:
    if (data / "zoo.json").exists():
        meta = json.loads((data / "zoo.json").read_text())
        return [data / f["name"] for f in meta["families"]]
    return [data]


def _complete(root: Path) -> bool:
    if not (root / "dataset.json").exists():
        return False
    n = json.loads((root / "dataset.json").read_text())["num_shards"]
    return all((root / f"shard-{i:05d}-of-{n:05d}.safetensors").exists() for i in range(n))


def _ms(xs: list[float]) -> str:
    t = torch.tensor(xs, dtype=torch.float64)
    sd = float(t.std()) if len(xs) > 1 else 0.0
    return f"{float(t.mean()):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="zoo folder")
    ap.add_argument("--zoo", choices=["varied", "base"], default="varied", help="if made here")
    ap.add_argument("--n", type=int, default=1250, help="CNNs per family, if made here")
    ap.add_argument("--max-steps", type=int, default=None, help="cap (quick zoos only)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--mixed", action="store_true", help="also one GMN on all families")
    ap.add_argument("--mixed-data", type=Path, default=DEFAULT_MIXED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "generalization.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tasks.generalization import fit, probe_features
    from tasks.inr import WeightDataset
    from tasks.zoo import make_varied_zoo, make_zoo

    made = ""
    families = _families(args.data)
    if not all(_complete(f) for f in families):
        t0 = time.perf_counter()
        if args.zoo == "varied":
            make_varied_zoo(args.data, args.n, max_steps=args.max_steps, progress=False)
        else:
            make_zoo(args.data, args.n, max_steps=args.max_steps, progress=False)
        made = f" The zoo was made in this run ({time.perf_counter() - t0:.0f} s)."
        families = _families(args.data)
    kinds = args.models.split(",")
    # results[kind][family] = one FitResult per seed
    results: dict[str, dict[str, list]] = {k: {} for k in kinds}
    lines_zoo = []
    for fam in families:
        ds = WeightDataset(fam)
        accs = torch.tensor([r["accuracy"] for r in ds.rows], dtype=torch.float64)
        q = torch.quantile(accs, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).double())
        counts = [sum(r["split"] == s for r in ds.rows) for s in ("train", "val", "test")]
        lines_zoo.append(
            f"| {fam.name} | {ds.meta['architecture']} | {ds.space.num_params:,} | "
            f"{len(ds):,} ({' / '.join(f'{c:,}' for c in counts)}) | "
            + " / ".join(f"{v:.2f}" for v in q.tolist())
            + " |"
        )
        probe = probe_features(fam, args.probes) if any("probe" in k for k in kinds) else None
        for kind in kinds:
            for seed in range(args.seeds):
                r = fit(
                    kind,
                    fam,
                    epochs=args.epochs,
                    patience=args.patience,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    hidden=args.hidden,
                    seed=seed,
                    probe=probe,
                )
                results[kind].setdefault(fam.name, []).append(r)
                print(
                    f"{fam.name} {kind} seed {seed}: test τ {r.test_kendall_tau:.3f} "
                    f"(val {r.val_kendall_tau:.3f}, epoch {r.best_epoch}/{r.epochs}), "
                    f"{r.seconds:.1f} s",
                    flush=True,
                )
    mixed_lines = _mixed(args, families) if args.mixed else []

    names = [f.name for f in families]

    def per_seed_mean(kind: str) -> list[float]:  # τ averaged over families, per seed
        return [
            statistics.fmean(results[kind][f][s].test_kendall_tau for f in names)
            for s in range(args.seeds)
        ]

    def score(kind: str) -> float:
        m = statistics.fmean(per_seed_mean(kind))
        return m if m == m else -math.inf

    order = sorted(kinds, key=score, reverse=True)
    lines = [
        "# Generalization prediction on the CNN zoo (Kendall τ)",
        "",
        "| family | architecture | parameters | CNNs (train / val / test) | test accuracy "
        "min / q1 / median / q3 / max |",
        "|---|---|---:|---|---|",
        *lines_zoo,
        "",
        f"Each predictor regresses test accuracy (MSE), up to {args.epochs} epochs (early "
        f"stopping on val τ, patience {args.patience}), batch {args.batch_size}, Adam "
        f"{args.lr:g} cosine, {args.hidden} channels, {args.probes} probe images (digits "
        f"training images) for +probe, {args.seeds} seed(s), {args.threads} thread(s); "
        f"Kendall τ on each family's test split at the best val epoch.{made}",
        "",
        "| predictor | mean test τ over families | "
        + " | ".join(names)
        + " | best epoch | wall time / run |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for kind in order:
        rs = [r for f in names for r in results[kind][f]]
        lines.append(
            f"| {NAMES.get(kind, kind)} | **{_ms(per_seed_mean(kind))}** | "
            + " | ".join(_ms([r.test_kendall_tau for r in results[kind][f]]) for f in names)
            + f" | {statistics.fmean(r.best_epoch for r in rs):.0f} | "
            f"{statistics.fmean(r.seconds for r in rs):.1f} s |"
        )
    lines += ["", *_verdict(kinds, score, per_seed_mean), *mixed_lines]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {args.out}")
    return 0


def _verdict(kinds, score, per_seed_mean) -> list[str]:
    out = []
    if "statnn" in kinds:
        ref = score("statnn")
        beat = [k for k in kinds if k != "statnn" and score(k) >= ref + 0.02]
        out.append(
            f"Beat StatNN ({ref:.3f}) by ≥ 0.02 τ: "
            + (", ".join(f"{NAMES.get(k, k)} ({score(k):+.3f})" for k in beat) or "none")
            + "."
        )
    nfn = [k for k in kinds if k.startswith("nfn-") and "+" not in k]
    if nfn:
        best = max(nfn, key=score)
        ahead = [k for k in kinds if k not in nfn and score(k) > score(best)]
        out.append(
            f"Ahead of `nfn`'s best ({NAMES[best]}, {score(best):.3f}): "
            + (", ".join(NAMES.get(k, k) for k in ahead) or "none")
            + "."
        )
    return out


def _mixed(args, families: list[Path]) -> list[str]:
    from tasks.mixed_zoo import fit_mixed

    roots = list(families)
    if args.mixed_data.exists():
        roots += [p for p in sorted(args.mixed_data.iterdir()) if _complete(p)]
    taus, secs = [], []
    per: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        r = fit_mixed(
            roots,
            epochs=args.epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            lr=args.lr,
            hidden=args.hidden,
            seed=seed,
        )
        taus.append(r.test_kendall_tau)
        secs.append(r.seconds)
        for name, t in r.family_tau.items():
            per.setdefault(name, []).append(t)
        print(f"mixed GMN seed {seed}: pooled test τ {r.test_kendall_tau:.3f}, {r.seconds:.0f} s")
    return [
        "",
        f"## One GMN on all {len(roots)} families at once (mixed architectures)",
        "",
        "| pooled test τ | " + " | ".join(per) + " | wall time / run |",
        "|---:|" + "---:|" * len(per) + "---:|",
        f"| {_ms(taus)} | "
        + " | ".join(_ms(v) for v in per.values())
        + f" | {statistics.fmean(secs):.0f} s |",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
