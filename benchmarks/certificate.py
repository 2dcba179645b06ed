"""Symmetry certificates for the zoo: claimed continuous dims vs the measured deficiency.

For every zoo model with at most ``--max-params`` parameters (8,000: the float64 Jacobian
has ``rows ≥ 2·P`` rows and its SVD costs ``O(rows · P²)``), plus narrower instances of
two that do not fit (ResNet-20 at base width 1: 1/2/4 channels, 1,229 parameters, the same
stem, 3 stages × 3 BasicBlocks and shortcuts; a ViT with d 8, 2 heads of 4, depth 2, MLP 16
on 8×8 images), ``metanet.testing.symmetry_certificate`` measures the
rank of ``θ ↦ (f_θ(x_1), …, f_θ(x_N))`` (float64, norms at eps ≈ 0, BatchNorm on batch
statistics; Gaussian inputs at scales e^[-1, 2]) and holds ``P − rank`` against what the
converter's WeightSpace claims (positive scaling, GL, norm scale).

Writes ``benchmarks/results/certificate.md``.

Size limit: 8,000 parameters by default (J is rows × P float64, rows ≥ 2·P, doubled
up to 40,000 rows until the rank saturates). ResNet-20 at base width 2 (4,556 parameters)
fits but did not saturate within the 40,000-row cap (37 minutes at one thread), hence
base width 1.

    python benchmarks/certificate.py          # ~40 minutes at one loaded thread
    python benchmarks/certificate.py resnet20 shufflenet_tiny   # ~20 s
    python benchmarks/certificate.py mlp cnn_bn
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from converters import from_module  # noqa: E402
from metanet.testing import symmetry_certificate  # noqa: E402
from tests.fixtures.architectures import (  # noqa: E402
    ZOO,
    ResNet20,
    ViTTiny,
    randomize_batchnorm,
    randomize_norms_and_biases,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _images(shape: tuple[int, ...]):
    def make(n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, *shape, dtype=torch.float64, generator=g)
        s = torch.rand(n, *[1] * len(shape), dtype=torch.float64, generator=g) * 3 - 1
        return x * torch.exp(s)

    return make


def _narrow():
    torch.manual_seed(0)
    resnet = randomize_batchnorm(ResNet20(base=1)).eval()
    torch.manual_seed(0)
    vit = ViTTiny(image=8, patch=4, dim=8, heads=2, depth=2, mlp_dim=16, num_classes=4)
    vit = randomize_norms_and_biases(vit).eval()
    return [
        ("resnet20 (base width 1)", resnet, (3, 8, 8)),
        ("vit (d 8, 2 heads, depth 2)", vit, (3, 8, 8)),
    ]


def models(max_params: int):
    out = []
    for e in ZOO:
        if not e.available():
            continue
        model = e.build()
        x = e.inputs()[0]
        n = sum(p.numel() for p in model.parameters())
        if n > max_params or len(e.inputs()) != 1 or not x.is_floating_point():
            continue
        out.append((e.name, model, tuple(x.shape[1:])))
    return out + _narrow()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="only these (default: all that fit)")
    ap.add_argument("--max-params", type=int, default=8000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    skipped = [
        f"{e.name} ({sum(p.numel() for p in e.build().parameters()):,})"
        for e in ZOO
        if e.available()
        and not e.name.startswith("hf_minilm")
        and sum(p.numel() for p in e.build().parameters()) > args.max_params
    ]
    for name, model, shape in models(args.max_params):
        if args.names and name.split(" ")[0] not in args.names:
            continue
        model = model.double()
        example = (_images(shape)(2),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            space = from_module(model, example)
        t0 = time.perf_counter()
        cert = symmetry_certificate(model, space, _images(shape), max_params=args.max_params)
        wall = time.perf_counter() - t0
        print(f"{name}: {cert} [{wall:.0f} s]", flush=True)
        kinds = " + ".join(f"{v} {k}" for k, v in cert.claimed_by_kind.items() if v) or "0"
        rows.append(
            f"| {name} | {cert.params:,} | {cert.rows:,} | {cert.rank:,} | {cert.deficiency} | "
            f"{cert.claimed} ({kinds}) | {cert.verdict} | {cert.smallest_kept:.0e} / "
            f"{cert.largest_dropped:.0e} | {wall:.0f} |"
        )
    lines = [
        "Float64 Jacobian of the outputs on N inputs w.r.t. every parameter; rank = singular "
        "values above 1e-10 σ_max; rows doubled until the rank of the first 5/6 equals it. "
        "Norm eps ≈ 0, BatchNorm on batch statistics (chunks of 4 inputs). 1 thread.",
        "",
        "| model | params P | rows | rank | P − rank | claimed | verdict "
        "| σ kept ≥ / dropped ≤ (÷ σ_max) | s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Too large for the certificate (> {args.max_params:,} parameters): "
        + ", ".join(skipped)
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.names:
        RESULTS.mkdir(exist_ok=True)
        tmp = RESULTS / ".certificate.md.tmp"
        tmp.write_text(text)
        os.replace(tmp, RESULTS / "certificate.md")


if __name__ == "__main__":
    main()
