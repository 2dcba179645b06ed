"""INR editing (dilation): a metanetwork edits a SIREN's weights so it draws the dilated digit.

Data: ``tasks.learn.inr_edit.make_edit_pairs`` — one (original, dilated) INR pair per image of
scikit-learn's 8×8 digits (1,797 pairs; dilation = 3×3 max-pool, stride 1, padding 1),
both fitted with the default ``INRConfig`` (the DWSNets recipe) from the same init seed;
split by image 70/10/20 as ``tasks.datasets.inr.make_dataset`` splits. Editors
(``tasks.learn.inr_edit.build_editor``) predict the residual Δ added to the input weights:
``identity`` (Δ = 0), ``flat`` (MLP on the flattened weights), ``unf`` (UNFLinear stack,
full basis), ``gmn`` (equivariant GMN). Trained on the image MSE of the rendered edited
INR against the dilated image; test image MSE and weight MSE of the model after the last
epoch, mean ± std over ``--seeds`` seeds. Writes ``benchmarks/results/inr_editing.md`` and
``inr_editing.png`` (test images: original, target, each editor's output).

    python benchmarks/inr_editing.py                       # ~15 min at 1 thread
    python benchmarks/inr_editing.py --limit 300 --epochs 2 --seeds 1   # a look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metanet.io import atomic_write  # noqa: E402
from tasks.datasets.inr import INRConfig  # noqa: E402
from tasks.learn.inr_edit import EDITORS, make_edit_pairs, render, train_editor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = ROOT / "out" / "inr-edit-pairs.safetensors"
LABELS = {
    "identity": "identity (Δ = 0)",
    "flat": "flat MLP",
    "unf": "UNF (metanet, full basis)",
    "gmn": "GMN (metanet, equivariant)",
}


def _ms(xs: list[float], scale: float = 1.0, digits: int = 4) -> str:
    xs = [x * scale for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="pair cache (made if missing)")
    ap.add_argument("--out", default=str(RESULTS / "inr_editing.md"))
    ap.add_argument("--models", nargs="+", default=list(EDITORS), choices=EDITORS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--gmn-epochs", type=int, default=None, help="default: --epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=None, help="editor width (default per kind)")
    ap.add_argument("--images", type=int, default=None, help="first N images only (quick)")
    ap.add_argument("--steps", type=int, default=None, help="INR fitting steps (quick)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = INRConfig() if args.steps is None else INRConfig(steps=args.steps)
    t0 = time.perf_counter()
    pairs = make_edit_pairs(args.data, cfg=cfg, limit=args.images)
    n = {s: len(pairs.indices(s)) for s in ("train", "val", "test")}
    print(
        f"{len(pairs)} pairs ({n}), fitted in {pairs.seconds:.0f} s; "
        f"PSNR {pairs.psnr_orig.mean():.2f} / {pairs.psnr_edit.mean():.2f} dB"
    )
    results: dict[str, list] = {}
    editors = {}
    for kind in args.models:
        epochs = args.gmn_epochs if kind == "gmn" and args.gmn_epochs is not None else args.epochs
        for seed in range(args.seeds if kind != "identity" else 1):
            ed, r = train_editor(
                kind,
                pairs,
                epochs=epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                hidden=args.hidden,
                seed=seed,
            )
            results.setdefault(kind, []).append((r, epochs if kind != "identity" else "—"))
            editors.setdefault(kind, ed)
            print(
                f"{kind} seed {seed}: test image MSE {r.test_image_mse:.4f}, weight MSE "
                f"{r.test_weight_mse:.3e}, {r.seconds:.0f} s",
                flush=True,
            )
    out = Path(args.out)
    ident = (
        statistics.mean(r.test_image_mse for r, _ in results.get("identity", []) or [])
        if "identity" in results
        else None
    )
    lines = [
        "# INR editing (dilation) on scikit-learn digits",
        "",
        f"{len(pairs)} (original, dilated) SIREN pairs, one per image, default `INRConfig` "
        f"(DWSNets recipe{'' if args.steps is None else f', {args.steps} steps'}), both INRs of "
        "a pair fitted from the same init seed; split by image "
        f"{n['train']} / {n['val']} / {n['test']}. Mean PSNR original "
        f"{pairs.psnr_orig.mean():.2f} dB, dilated {pairs.psnr_edit.mean():.2f} dB; "
        f"fitting took {pairs.seconds:.0f} s ({args.threads} thread(s)).",
        "",
        f"Editors predict Δ (added to the input weights), trained on the image MSE of the "
        f"rendered edited INR vs the dilated image: batch {args.batch_size}, Adam "
        f"{args.lr:g} with a cosine schedule, {args.seeds} seed(s) (model init and batch "
        "order); test metrics of the model after the last epoch. Image MSE: pixels in "
        "[0, 1], mean over the 64 pixels and the test INRs. Weight MSE: predicted vs fitted "
        "edited INR, mean over the 1,185 parameters.",
        "",
        "| editor | test image MSE | vs identity | test weight MSE (×1e-5) | val image MSE "
        "| epochs | parameters | wall time / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, rs in results.items():
        img = [r.test_image_mse for r, _ in rs]
        rel = f"{100 * (statistics.mean(img) / ident - 1):+.1f}%" if ident else "—"
        lines.append(
            f"| {LABELS[kind]} | {_ms(img)} | {rel} | "
            f"{_ms([r.test_weight_mse for r, _ in rs], 1e5, 3)} | "
            f"{_ms([r.val_image_mse for r, _ in rs])} | {rs[0][1]} | {rs[0][0].parameters:,} | "
            f"{statistics.mean(r.seconds for r, _ in rs):.0f} s |"
        )
    lines += ["", f"Total wall time {time.perf_counter() - t0:.0f} s.", ""]
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    print("\n".join(lines))
    _plot(pairs, editors, out.with_suffix(".png"))
    return 0


@torch.no_grad()
def _plot(pairs, editors, path: Path, k: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = pairs.indices("test")[:k]
    rows = [("original", pairs.image[idx]), ("target (dilated)", pairs.target[idx])]
    for kind, ed in editors.items():
        ed.eval()
        pred = ed({n: t[idx] for n, t in pairs.orig.items()})
        rows.append((LABELS[kind], render(pairs.cfg, pred)))
    fig, axes = plt.subplots(
        len(rows), len(idx), figsize=(1.2 * len(idx), 1.3 * len(rows)), squeeze=False
    )
    for r, (name, imgs) in enumerate(rows):
        for c in range(len(idx)):
            ax = axes[r][c]
            ax.imshow(imgs[c].reshape(8, 8).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
