"""INR classification: which digit does a SIREN draw? Metanetworks read only its weights.

Models (``tasks.learn.train.build_model``), all trained by ``tasks.learn.train.train`` on the same
dataset, split and training subset, with the same optimizer settings:

* ``gmn`` — metanet's graph metanetwork on ``ParamGraph`` batches;
* ``unf`` — metanet's UNF classifier (full equivariant basis, Fourier-encoded inputs);
* ``nfn-hnp`` / ``nfn-np`` — the ``nfn`` package's ``HNPLinear``/``NPLinear`` layers with
  ReLU, ``HNPPool``/``NPPool`` and an MLP head, as nfn's INR-classification models are
  built (the same input encoding, channels and head width as ``unf``);
* ``scalegmn`` — metanet's ScaleGMN-style graph metanetwork: layers equivariant to the
  sign flips of the SIREN's hidden neurons (no canonicalization needed);
* ``statnn`` — per-tensor statistics + MLP (Unterthiner et al. 2020);
* ``flat`` — an MLP on the flattened weights, trained with random-permutation
  augmentation.

A ``+sign`` suffix (``unf+sign``, ``gmn+sign``) trains the model on the sign canonical
form of the weights (``train(canonicalize=True)``, :func:`metanet.canonicalize_sign`):
``sin`` is odd, so every hidden neuron of a SIREN can be negated (incoming row, bias and
outgoing column) without changing the image; the WeightSpace marks these groups
``action="sign"`` and the canonicalization picks one sign per neuron from the values only
that neuron's flip changes. The permutation-equivariant models then no longer have to
learn that symmetry from data (``nfn``'s models know only permutations; ScaleGMN,
96.6% vs NFN's 92.9% on MNIST INRs, builds the sign/scale symmetries into its layers). ``nfn-hnp+sign`` is the
ablation: ``nfn``'s HNP model fed our canonical weights. A ``+flip`` suffix is the other
way to handle the symmetry: train on random sign flips as well as permutations
(``train(flip_signs=True)``), no canonicalization. A ``+aug`` suffix trains on a fresh
random affine map of every training INR's input coordinates per draw
(``train(coords=CoordAugment(...))``, ``--coords`` sets its ranges): the first layer
edited so that the INR draws its image rotated, scaled, sheared and shifted, the
weight-space counterpart of image augmentation (exact; the label is kept);
``--coords contrast=0.2,brightness=0.1`` also changes the values drawn (``f -> a f + c``,
in the output layer).

The dataset is ``tasks.datasets.inr.make_dataset``'s default: 10 SIRENs per image of scikit-learn's
8×8 digits (17,970 INRs, split by image 70/10/20), the DWSNets recipe (2-32-32-1, w0 30,
Adam 5e-4, up to 1,000 steps, each INR stopped at 40 dB). ``--data`` points at a folder
made by ``metanet inr make`` or ``make_dataset``; a missing one is made first (about
10 CPU-minutes at one thread). More views of the same images: ``metanet inr make
out/inr-digits-20 --per-image 20`` (the same split by image, about 40 CPU-minutes), then
``--data out/inr-digits-20`` (the render ceiling is retrained on that folder's renders).
Test accuracy is that of the model after the last epoch (no early stopping on test); mean ± std over ``--seeds`` seeds (seed = model
initialization and minibatch order). Writes ``benchmarks/results/inr_classification.md``
and ``inr_classification.png`` (test accuracy after each epoch, mean over seeds).

    python benchmarks/inr_classification.py                  # ~35 min at 1 thread
    python benchmarks/inr_classification.py --epochs 12 --models unf+sign,nfn-hnp+sign,unf,nfn-hnp,nfn-np --out benchmarks/results/inr_classification_12ep.md  # ~25 min
    python benchmarks/inr_classification.py --models unf+flip,nfn-hnp+flip --out benchmarks/results/inr_classification_flip.md  # ~4 min
    python benchmarks/inr_classification.py --limit 2000 --epochs 3 --seeds 1   # a look
    # weights alone, 20 views per image; UNF and nfn's HNP side by side (one core each)
    python benchmarks/inr_classification.py --data out/inr-digits-20 --models unf+sign+aug --coords contrast=0.2,brightness=0.1 --epochs 60 --patience 5 --no-track-test --out benchmarks/results/inr_classification_views20_vals_unf.md  # ~60 min
    python benchmarks/inr_classification.py --data out/inr-digits-20 --models nfn-hnp+sign+aug --coords contrast=0.2,brightness=0.1 --epochs 60 --patience 5 --no-track-test --out benchmarks/results/inr_classification_views20_vals_hnp.md  # ~90 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metanet.io import atomic_write  # noqa: E402
from tasks.datasets.inr import CoordAugment, INRConfig, WeightDataset, make_dataset, render  # noqa: E402
from tasks.learn.train import GRAPH_KINDS, TrainResult, build_model, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = ROOT / "out" / "inr-digits"
MODELS = (
    "unf+sign+probe",
    "gmn+sign+probe",
    "transformer+sign+probe",
    "unf+sign",
    "gmn+sign",
    "transformer+sign",
    "scalegmn",
    "nfn-hnp",
    "nfn-np",
    "nfn-hnp+sign",
    "statnn",
    "flat",
)
LABELS = {
    "unf+sign": "UNF (metanet) + sign canonicalization",
    "gmn+sign": "GMN (metanet) + sign canonicalization",
    "nfn-hnp+sign": "ablation: NFN-HNP (`nfn`) + metanet's sign canonicalization",
    "unf+flip": "UNF (metanet) + sign-flip augmentation",
    "nfn-hnp+flip": "NFN-HNP (`nfn`) + sign-flip augmentation",
    "gmn": "GMN (metanet)",
    "transformer": "graph transformer (metanet)",
    "scalegmn": "ScaleGMN-style (metanet: sign-equivariant layers)",
    "unf": "UNF (metanet, full basis)",
    "nfn": "UNF (metanet, NFN basis)",
    "nfn-hnp": "NFN-HNP (`nfn` package)",
    "nfn-np": "NFN-NP (`nfn` package)",
    "statnn": "StatNN",
    "flat": "flat MLP (+ permutation augmentation)",
}


def _label(spec: str) -> str:
    if spec in LABELS:
        return LABELS[spec]
    kind, sign, flip, probe, aug = _split(spec)
    base = LABELS.get(kind, kind)
    return base + "".join(
        text
        for on, text in (
            (sign, " + sign canonicalization"),
            (flip, " + sign-flip augmentation"),
            (aug, " + coordinate augmentation"),
            (probe, " + probe features"),
        )
        if on
    )


def render_ceiling(
    data: Path, seed: int, epochs: int = 60, patience: int = 8, batch: int = 64, lr: float = 1e-3
) -> dict:
    """The accuracy the INRs' own images allow: a small CNN trained on the images the
    INRs draw (:func:`tasks.datasets.inr.render`, same split), early stopping on validation."""
    from torch import nn

    t0 = time.perf_counter()
    sets = {s: WeightDataset(data, s) for s in ("train", "val", "test")}
    x = {s: render(ds)[:, None] for s, ds in sets.items()}
    y = {s: ds.labels for s, ds in sets.items()}
    mean, std = float(x["train"].mean()), float(x["train"].std())
    x = {s: (v - mean) / std for s, v in x.items()}
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def acc(s: str) -> float:
        net.eval()
        with torch.no_grad():
            out = float((net(x[s]).argmax(-1) == y[s]).float().mean())
        net.train()
        return out

    best, best_state, best_epoch, epoch = -1.0, None, 0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(y["train"]), generator=gen)
        for a in range(0, len(order) - batch + 1, batch):
            i = order[a : a + batch]
            loss = nn.functional.cross_entropy(net(x["train"][i]), y["train"][i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        v = acc("val")
        if v > best:
            best, best_epoch = v, epoch
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    return {
        "test": acc("test"),
        "val": best,
        "epochs": epoch + 1,
        "params": sum(q.numel() for q in net.parameters()),
        "seconds": time.perf_counter() - t0,
    }


def _have_nfn() -> bool:
    try:
        import nfn  # noqa: F401
    except ImportError:
        return False
    return True


def _split(spec: str) -> tuple[str, bool, bool, bool, bool]:
    """``"unf+sign+probe"`` -> ``("unf", True, False, True, False)``: the model kind,
    whether it reads the sign canonical form of the weights (``train(canonicalize=True)``),
    whether it is trained on random sign flips instead (``+flip``:
    ``train(flip_signs=True)``), whether it gets probe features too (``+probe``:
    ``train(probes=--probes)``), and whether its training INRs get random affine maps of
    their input coordinates (``+aug``: ``train(coords=CoordAugment())``)."""
    kind, *flags = spec.split("+")
    if any(f not in ("sign", "flip", "probe", "aug") for f in flags):
        raise ValueError(f"model {spec!r}: the suffixes are +sign, +flip, +probe and +aug")
    return kind, "sign" in flags, "flip" in flags, "probe" in flags, "aug" in flags


def _coord_augment(text: str) -> CoordAugment:
    """``"rotate=20,shift=0.15"`` -> ``CoordAugment(rotate=20.0, shift=0.15)``."""
    try:
        return CoordAugment.parse(text)
    except ValueError as e:
        raise SystemExit(f"--coords: {e}") from None


def _params(spec: str, data: Path, hidden: int, frequencies: int, probes: int) -> int:
    kind, _, _, probe, _ = _split(spec)
    graph = kind in GRAPH_KINDS
    ds = WeightDataset(data, "test", "graph" if graph else "weights", probes=probes if probe else 0)
    model = build_model(
        kind,
        ds.space,
        10,
        hidden,
        example_graph=ds[0] if graph else None,
        frequencies=frequencies,
    )
    return sum(p.numel() for p in model.parameters())


def _mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="INR dataset folder")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--only-seeds",
        default=None,
        help="comma list: train only these of the --seeds (other processes run the rest; "
        "with --runs)",
    )
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="training INRs (a fixed subset)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=16, help="channels / hidden width")
    ap.add_argument("--frequencies", type=int, default=4, help="Fourier input encoding")
    ap.add_argument("--schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--no-track-test",
        dest="track_test",
        action="store_false",
        help="evaluate test only at the end (curves show validation accuracy)",
    )
    ap.add_argument("--probes", type=int, default=64, help="probe points of the +probe models")
    ap.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping on val (off by default); 20 with a 60-epoch budget: a "
        "500-image validation set is noisy, and at 12 runs stopped before the cosine "
        "schedule annealed",
    )
    ap.add_argument(
        "--coords",
        default="",
        metavar="K=V,...",
        help="the +aug models' CoordAugment fields, e.g. rotate=20,shift=0.15 (default: its "
        "defaults)",
    )
    ap.add_argument(
        "--no-ceiling", dest="ceiling", action="store_false", help="skip the render ceiling"
    )
    ap.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="a JSON-lines file of finished runs: each run is appended when it ends, runs "
        "found there are not repeated (resume; several processes may share it), and the "
        "table shows every model of --models found there",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "inr_classification.md")
    ap.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    coords = _coord_augment(args.coords)  # a bad --coords fails here, before any training

    models = [m for m in args.models.split(",") if m]
    if any(m.startswith("nfn-") for m in models) and not _have_nfn():
        print("the nfn package is not installed: skipping its models", file=sys.stderr)
        models = [m for m in models if not m.startswith("nfn-")]
    if not (args.data / "dataset.json").exists() or _incomplete(args.data):
        t = time.perf_counter()
        make_dataset(args.data, per_image=10, cfg=INRConfig(), progress=True)
        print(f"made {args.data} in {(time.perf_counter() - t) / 60:.1f} min", file=sys.stderr)
    meta = json.loads((args.data / "dataset.json").read_text())
    full = WeightDataset(args.data)
    n_split = {s: sum(r["split"] == s for r in full.rows) for s in ("train", "val", "test")}
    n_train = min(args.limit, n_split["train"]) if args.limit else n_split["train"]

    results: dict[str, list] = {}
    wall0 = time.perf_counter()
    ceiling = []
    if args.ceiling:
        # cached beside the data (it depends on nothing else), so that several benchmark
        # processes over one dataset train it once
        cache = args.data / "render_ceiling.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        for seed in range(args.seeds):
            if str(seed) not in known:
                known[str(seed)] = render_ceiling(args.data, seed)
                atomic_write(cache, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=2)))
            ceiling.append(known[str(seed)])
            print(f"render ceiling seed {seed}: test {ceiling[-1]['test']:.3f}", file=sys.stderr)
    settings = _settings(args, coords)
    done = _load_runs(args.runs, args.data, settings)
    for spec in models:
        kind, canonical, flip, probe, aug = _split(spec)
        runs = []
        for seed in range(args.seeds):
            if (spec, seed) in done:
                runs.append(done[spec, seed])
                continue
            if args.only_seeds is not None and str(seed) not in args.only_seeds.split(","):
                continue
            r = train(
                kind,
                args.data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                hidden=args.hidden,
                seed=seed,
                limit=args.limit,
                progress=False,
                frequencies=args.frequencies,
                track_test=args.track_test,
                schedule=args.schedule,
                canonicalize=canonical,
                flip_signs=flip,
                probes=args.probes if probe else 0,
                patience=args.patience,
                coords=coords if aug else None,
            )
            runs.append(r)
            done[spec, seed] = r
            if args.runs is not None:
                row = {"spec": spec, "seed": seed, "data": str(args.data), "settings": settings,
                       **asdict(r)}  # fmt: skip
                with open(args.runs, "a") as f:  # one short line: appends do not interleave
                    f.write(json.dumps(row) + "\n")
            print(
                f"{spec} seed {seed}: test {r.test_accuracy:.3f} val {r.val_accuracy:.3f} "
                f"epochs {r.epochs} ({r.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        if not runs:  # --only-seeds: none of this model's seeds here (yet)
            continue
        results[spec] = runs
        _write(args, meta, full, n_split, n_train, ceiling, results, time.perf_counter() - wall0)
    _write(args, meta, full, n_split, n_train, ceiling, results, time.perf_counter() - wall0)
    plot = args.plot or args.out.with_suffix(".png")
    _plot(results, plot)
    print(f"wrote {args.out} and {plot}", file=sys.stderr)
    return 0


def _settings(args, coords) -> dict:
    """What a run's result depends on besides its model, seed and data (not: threads,
    whether test accuracy is tracked per epoch)."""
    keys = ("epochs", "limit", "batch_size", "lr", "hidden", "frequencies", "schedule")
    return {**{k: getattr(args, k) for k in keys}, "probes": args.probes,
            "patience": args.patience, "coords": repr(coords)}  # fmt: skip


def _load_runs(path: Path | None, data: Path, settings: dict) -> dict[tuple[str, int], TrainResult]:
    """The runs on ``data`` with these ``settings`` recorded in ``path`` (``--runs``), by
    ``(spec, seed)``. Runs made with other settings are not this table's: they are passed
    over (and said once), never mixed in."""
    if path is None or not path.exists():
        return {}
    out, other = {}, 0
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            spec, seed = row.pop("spec"), row.pop("seed")
            if row.pop("data", None) != str(data):
                continue
            if row.pop("settings", None) != settings:
                other += 1
                continue
            row = {k: (float("nan") if v is None else v) for k, v in row.items()}
            out[spec, seed] = TrainResult(**row)
    if other:
        print(f"{path}: {other} run(s) on {data} with other settings passed over", file=sys.stderr)
    return out


def per_image(meta: dict) -> str:
    """How many INRs each image has: ``3 (train), 1 (val/test)`` for a set made with
    ``--train-views``."""
    if meta.get("train_per_image"):
        return f"{meta['train_per_image']} (train), {meta['per_image']} (val/test)"
    return str(meta["per_image"])


def _write(args, meta, full, n_split, n_train, ceiling, results, wall=None) -> None:
    """The table so far (rewritten after every model: a cut-short run keeps its rows)."""
    # the runs' own wall times (some may come from --runs, made by other processes)
    wall = sum(r.seconds for runs in results.values() for r in runs)
    wall += sum(c["seconds"] for c in ceiling)
    psnr = full.psnr
    cfg = meta["config"]
    source = meta.get("source")
    images = (
        f"`{Path(source['path']).name}`'s images"
        if isinstance(source, dict) and source.get("kind") == "images"
        else "scikit-learn's digits"
    )
    caption = (
        f"torch {torch.__version__}, {args.threads} thread(s). Data: {len(full):,} SIREN INRs "
        f"({per_image(meta)} per image of {images} at {meta['resolution']}×"
        f"{meta['resolution']}; {cfg['in_features']}-"
        + "-".join([str(cfg["hidden"])] * cfg["depth"])
        + f"-{cfg['out_features']}, variant {cfg['variant']}, w0 {cfg['w0']:g}, "
        f"Adam lr {cfg['lr']:g}, ≤{cfg['steps']} steps"
        + (f", stopped at {cfg['target_psnr']:g} dB" if cfg.get("target_psnr") else "")
        + f"; PSNR mean {psnr.mean():.1f} dB, min {psnr.min():.1f}); split by image "
        f"{n_split['train']:,}/{n_split['val']:,}/{n_split['test']:,}. "
        + (
            f"**Training on a fixed random subset of {n_train:,} of the {n_split['train']:,} "
            "training INRs** (the same for every model and seed); "
            if n_train < n_split["train"]
            else "Training on the full training split; "
        )
        + (
            f"up to {args.epochs} epochs with early stopping on validation accuracy (patience "
            f"{args.patience}; test accuracy of the best validation epoch), "
            if args.patience
            else f"{args.epochs} epochs, "
        )
        + f"batch {args.batch_size}, Adam lr {args.lr:g} "
        f"({args.schedule}), width/channels {args.hidden}, Fourier input encoding with "
        f"{args.frequencies} frequencies for the equivariant models; `+probe`: "
        f"{args.probes} probe points; `+aug`: {_coord_augment(args.coords)} per training "
        f"draw; mean ± std over {args.seeds} seed(s). Render ceiling: "
        "a CNN trained on the images the INRs draw (same split); `of ceiling` = test accuracy "
        f"/ the ceiling's. Wall time: per run, mean; all runs {wall / 60:.1f} min."
    )
    lines = [
        caption,
        "",
        "| model | test accuracy % | of ceiling | val accuracy % | epochs | parameters | "
        "wall time / run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    top = statistics.mean(c["test"] for c in ceiling) if ceiling else float("nan")
    if ceiling:
        lines.append(
            f"| render ceiling: CNN on the images the INRs draw | "
            f"{_mean_std([c['test'] for c in ceiling])} | 1.00 | "
            f"{_mean_std([c['val'] for c in ceiling])} | "
            f"{statistics.mean(c['epochs'] for c in ceiling):.0f} | {ceiling[0]['params']:,} | "
            f"{statistics.mean(c['seconds'] for c in ceiling):.0f} s |"
        )
    for kind, runs in sorted(
        results.items(), key=lambda kv: -statistics.mean(r.test_accuracy for r in kv[1])
    ):
        acc = statistics.mean(r.test_accuracy for r in runs)
        lines.append(
            f"| {_label(kind)} | {_mean_std([r.test_accuracy for r in runs])} | "
            f"{f'{acc / top:.2f}' if ceiling else '–'} | "
            f"{_mean_std([r.val_accuracy for r in runs])} | "
            f"{statistics.mean(r.epochs for r in runs):.0f} | "
            f"{_params(kind, args.data, args.hidden, args.frequencies, args.probes):,} | "
            f"{statistics.mean(r.seconds for r in runs):.0f} s |"
        )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)


def _incomplete(root: Path) -> bool:
    n = json.loads((root / "dataset.json").read_text())["num_shards"]
    return len(list(root.glob(f"shard-*-of-{n:05d}.safetensors"))) < n


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for kind, runs in results.items():
        n = min(len(r.history) for r in runs)  # early stopping: runs differ in length
        epochs = [h["epoch"] for h in runs[0].history[:n]]
        key = "test_accuracy" if "test_accuracy" in runs[0].history[0] else "val_accuracy"
        curves = torch.tensor([[h[key] for h in r.history[:n]] for r in runs])
        mean = curves.mean(0)
        ax.plot(epochs, 100 * mean, marker="o", ms=3, label=_label(kind))
        if len(runs) > 1:
            lo, hi = curves.min(0).values, curves.max(0).values
            ax.fill_between(epochs, 100 * lo, 100 * hi, alpha=0.15)
    ax.set_xlabel("epoch")
    tracked = any("test_accuracy" in r.history[0] for runs in results.values() for r in runs)
    ax.set_ylabel(("test" if tracked else "validation") + " accuracy %")
    ax.set_title("INR classification (digits SIRENs), mean and range over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
