"""Generalization prediction on CNN zoos: Kendall τ of predicted vs true test accuracy.

The zoo is ``tasks.datasets.zoo.make_varied_zoo``'s (made first if missing): four CNN families on
scikit-learn's digits (depth 2–3, width 6–12, ReLU/tanh/GELU drawn per model), 1,250 CNNs
each with varied training recipes; ``--zoo base`` uses the original one-architecture zoo
(``tasks.datasets.zoo.make_zoo``). Every predictor (``tasks.learn.generalization.fit``: MSE on the
recorded test accuracy, Adam + cosine, early stopping on validation τ) is trained on each
family's train split for several seeds and scored by Kendall τ on its test split. Tables:
per family, and the mean over families (mean ± std over seeds), with wall time per run;
the verdict lines name the predictors that beat StatNN by ≥ 0.02 τ and ``nfn``'s best.
``--mixed`` adds one GMN trained on all families at once (``tasks.datasets.mixed_zoo``), with the
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
    "scalegmn": "ScaleGMN-style (metanet: scale-equivariant layers)",
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


def _settings(args) -> dict:
    keys = ("epochs", "patience", "batch_size", "lr", "hidden", "probes")
    return {k: getattr(args, k) for k in keys}


def _read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="zoo folder")
    ap.add_argument("--zoo", choices=["varied", "base"], default="varied", help="if made here")
    ap.add_argument("--n", type=int, default=1250, help="CNNs per family, if made here")
    ap.add_argument("--max-steps", type=int, default=None, help="cap (quick zoos only)")
    ap.add_argument("--families", default=None, help="comma list (default: every family)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--mixed", action="store_true", help="also one GMN on all families")
    ap.add_argument("--mixed-data", type=Path, default=DEFAULT_MIXED)
    ap.add_argument("--mixed-limit", type=int, default=None, help="train nets per family")
    ap.add_argument("--report", action="store_true", help="only write the table from the runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "generalization.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # every finished run is one line here: reruns skip it, and several processes (other
    # families, other models) can fill it at once; the table is made from all of it
    runs_path = args.out.with_name(args.out.stem + "_runs.jsonl")

    from tasks.datasets.zoo import make_varied_zoo, make_zoo
    from tasks.learn.generalization import fit, zoo_probe_features

    families = _families(args.data)
    wanted = args.families.split(",") if args.families else [f.name for f in families]
    if not args.report and not all(_complete(f) for f in families if f.name in wanted):
        if args.zoo == "varied":
            make_varied_zoo(args.data, args.n, max_steps=args.max_steps, progress=False)
        else:
            make_zoo(args.data, args.n, max_steps=args.max_steps, progress=False)
        families = _families(args.data)
    if not args.families:  # the zoo may have been made just now
        wanted = [f.name for f in families]
    families = [f for f in families if f.name in wanted]
    kinds = [k for k in args.models.split(",") if k]  # "" with --mixed: only that
    settings = _settings(args)
    if not args.report:
        done = {
            (r["family"], r["kind"], r["seed"])
            for r in _read_runs(runs_path)
            if r["settings"] == settings
        }
        for fam in families:
            todo = [
                (k, s) for k in kinds for s in range(args.seeds) if (fam.name, k, s) not in done
            ]
            if not todo:
                continue
            probe = None
            if any("probe" in k for k, _ in todo):
                probe = zoo_probe_features(fam, args.probes)
            for kind, seed in todo:
                if any(
                    (r["family"], r["kind"], r["seed"]) == (fam.name, kind, seed)
                    for r in _read_runs(runs_path)
                    if r["settings"] == settings
                ):
                    continue  # another process finished it meanwhile
                r = fit(
                    kind,
                    fam,
                    epochs=args.epochs,
                    patience=args.patience,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    hidden=args.hidden,
                    seed=seed,
                    probes=args.probes,
                    probe=probe,
                )
                row = {"family": fam.name, "kind": kind, "seed": seed, "settings": settings}
                row.update(
                    {
                        k: getattr(r, k)
                        for k in (
                            "test_kendall_tau",
                            "val_kendall_tau",
                            "test_mse",
                            "best_epoch",
                            "epochs",
                            "seconds",
                        )
                    }
                )
                runs_path.parent.mkdir(parents=True, exist_ok=True)
                with runs_path.open("a") as f:  # one short write per line
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{fam.name} {kind} seed {seed}: test τ {r.test_kendall_tau:.3f} "
                    f"(val {r.val_kendall_tau:.3f}, epoch {r.best_epoch}/{r.epochs}), "
                    f"{r.seconds:.1f} s",
                    flush=True,
                )
        if args.mixed:
            _mixed(args, _families(args.data), runs_path, settings)
    _report(args, _families(args.data), kinds, settings, runs_path)
    return 0


def _report(args, families: list[Path], kinds: list[str], settings: dict, runs_path: Path) -> None:
    from tasks.datasets.inr import WeightDataset

    runs = [r for r in _read_runs(runs_path) if r["settings"] == settings]
    # every predictor with runs, not only this invocation's: a run of one model (or of
    # --mixed alone) must not drop the others' rows from the file
    kinds = [k for k in dict.fromkeys([*kinds, *MODELS]) if any(r["kind"] == k for r in runs)]
    tau: dict[tuple[str, str], dict[int, float]] = {}
    secs: dict[str, list[float]] = {}
    best: dict[str, list[int]] = {}
    for r in runs:
        tau.setdefault((r["kind"], r["family"]), {})[r["seed"]] = r["test_kendall_tau"]
        secs.setdefault(r["kind"], []).append(r["seconds"])
        best.setdefault(r["kind"], []).append(r["best_epoch"])
    seeds = range(args.seeds)
    names = [f.name for f in families if f.name != "mixed"]
    lines_zoo = []
    for fam in families:
        if not _complete(fam):
            lines_zoo.append(f"| {fam.name} | (not finished) | | | |")
            continue
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

    def full(kind: str, fam: str) -> bool:
        return all(s in tau.get((kind, fam), {}) for s in seeds)

    def covered(kind: str) -> list[str]:
        return [f for f in names if full(kind, f)]

    def per_seed_mean(kind: str, fams: list[str]) -> list[float]:  # over families, per seed
        return [statistics.fmean(tau[(kind, f)][s] for f in fams) for s in seeds]

    present = [k for k in kinds if covered(k)]
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
        f"training images) for +probe, {args.seeds} seed(s), 1 thread per run; Kendall τ "
        "on each family's test split at the best val epoch, mean ± std over seeds. The "
        "mean column averages the families that predictor ran on (listed).",
        "",
        "| predictor | mean τ over its families | "
        + " | ".join(names)
        + " | best epoch | wall time / run |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|",
    ]

    def score(kind: str, fams: list[str]) -> float:
        return statistics.fmean(per_seed_mean(kind, fams)) if fams else -math.inf

    order = sorted(present, key=lambda k: score(k, covered(k)), reverse=True)
    for kind in order:
        fams = covered(kind)
        cells = [_ms([tau[(kind, f)][s] for s in seeds]) if full(kind, f) else "" for f in names]
        lines.append(
            f"| {NAMES.get(kind, kind)} | **{_ms(per_seed_mean(kind, fams))}** "
            f"({', '.join(fams)}) | "
            + " | ".join(cells)
            + f" | {statistics.fmean(best[kind]):.0f} | {statistics.fmean(secs[kind]):.0f} s |"
        )
    lines += ["", *_verdict(present, covered, score)]
    mixed = [
        r
        for r in _read_runs(runs_path)
        if r.get("kind") == "mixed-gmn" and r["settings"] == settings
    ]
    if mixed:
        fams = list(mixed[0]["family_tau"])
        lines += [
            "",
            f"## One GMN on {len(fams)} families at once (mixed architectures)",
            "",
            "| pooled test τ | " + " | ".join(fams) + " | seeds | wall time / run |",
            "|---:|" + "---:|" * len(fams) + "---:|---:|",
            f"| {_ms([r['test_kendall_tau'] for r in mixed])} | "
            + " | ".join(_ms([r["family_tau"][f] for r in mixed]) for f in fams)
            + f" | {len(mixed)} | {statistics.fmean(r['seconds'] for r in mixed):.0f} s |",
        ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"wrote {args.out}")


def _verdict(kinds: list[str], covered, score) -> list[str]:
    """Comparisons on the families both predictors ran on (all seeds)."""
    out = []

    def common(a: str, b: str) -> list[str]:
        return [f for f in covered(a) if f in covered(b)]

    if "statnn" in kinds:
        beat = []
        for k in kinds:
            fams = common(k, "statnn")
            if k != "statnn" and fams and score(k, fams) >= score("statnn", fams) + 0.02:
                beat.append(
                    f"{NAMES.get(k, k)} ({score(k, fams) - score('statnn', fams):+.3f} on {', '.join(fams)})"
                )
        out.append("Beat StatNN by ≥ 0.02 τ: " + ("; ".join(beat) or "none") + ".")
    nfn = [k for k in kinds if k.startswith("nfn-") and "+" not in k]
    if nfn:
        ahead = []
        for k in kinds:
            if k in nfn:
                continue
            fams = [f for f in covered(k) if all(f in covered(n) for n in nfn)]
            top = max(nfn, key=lambda n: score(n, fams)) if fams else None
            # ahead at the printed precision: a +0.000 lead is a tie
            if top and round(score(k, fams) - score(top, fams), 3) > 0:
                ahead.append(
                    f"{NAMES.get(k, k)} (vs {NAMES[top]}: {score(k, fams) - score(top, fams):+.3f})"
                )
        out.append("Ahead of `nfn`'s best: " + ("; ".join(ahead) or "none") + ".")
    return out


def _mixed(args, families: list[Path], runs_path: Path, settings: dict) -> None:
    """One GMN on every finished family (and the mixed zoo's ResNet/ViT families)."""
    from tasks.datasets.mixed_zoo import fit_mixed

    roots = [f for f in families if _complete(f)]
    if args.mixed_data.exists():
        roots += [p for p in sorted(args.mixed_data.iterdir()) if _complete(p)]
    done = {
        r["seed"]
        for r in _read_runs(runs_path)
        if r.get("kind") == "mixed-gmn" and r["settings"] == settings
    }
    for seed in range(args.seeds):
        if seed in done:
            continue
        r = fit_mixed(
            roots,
            epochs=args.epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            lr=args.lr,
            hidden=args.hidden,
            seed=seed,
            limit=args.mixed_limit,
        )
        row = {"family": "mixed", "kind": "mixed-gmn", "seed": seed, "settings": settings}
        row["roots"], row["limit"] = [p.name for p in roots], args.mixed_limit
        row.update(test_kendall_tau=r.test_kendall_tau, val_kendall_tau=r.val_kendall_tau,
                   family_tau=r.family_tau, best_epoch=r.best_epoch, epochs=r.epochs, seconds=r.seconds)  # fmt: skip
        with runs_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"mixed GMN seed {seed}: pooled test τ {r.test_kendall_tau:.3f}, {r.seconds:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
