"""Equivariant layer speed and memory: metanet's UNF layers vs the ``nfn`` package.

Same MLP weight batches, same channels, same batch size, forward + backward:

* ``NPLinear`` (nfn) vs ``UNFLinear`` on a space where input and output neurons are
  permutable too (NP);
* ``HNPLinear`` (nfn) vs ``UNFLinear`` on ``from_state_dict``'s space (inputs and outputs
  fixed, HNP);
* GMN per-graph throughput on the same networks' parameter graphs.

Time is the median of repeated steps, our layer and nfn's alternating step by step in
one fresh default process (so that load on a shared machine hits both alike); peak
memory is the resident-set high-water mark above the size before the first step, one
fresh process per layer with glibc's mmap threshold pinned (so freed buffers leave the
resident set and every allocation shows).

Ours runs ``basis="nfn"``. On NP weights it spans exactly ``NPLinear``'s maps; on HNP
weights it spans ``HNPLinear``'s plus one term that ``HNPLinear`` leaves out for three or
more layers (the penultimate bias read along the last layer's inputs). It has fewer
parameters all the same: nfn's layers hold several biases per output (they add up to
one) and, for HNP, means that are combinations of other inputs.

    pip install nfn && python benchmarks/layers.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from _memory import reset_peak, rss_bytes

CONFIGS = {
    "inr 2-32-32-1": ([2, 32, 32, 1], 128, 16),
    "mlp 784-128-128-10": ([784, 128, 128, 10], 32, 8),
}


def _np_space(sizes):
    from metanet import Axis, Group, TensorSpec, WeightSpace

    groups = [Group(f"n{i}", n) for i, n in enumerate(sizes)]
    tensors = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        tensors.append(
            TensorSpec(f"{i}.weight", (b, a), (Axis.of(f"n{i + 1}", b), Axis.of(f"n{i}", a)))
        )
        tensors.append(TensorSpec(f"{i}.bias", (b,), (Axis.of(f"n{i + 1}", b),)))
    return WeightSpace.build(groups, tensors)


def _layer_step(method: str, sizes: list[int], channels: int, feats: dict):
    """The layer for ``method`` and a forward+backward loss closure on ``feats``."""
    from converters import from_state_dict

    names = list(feats)
    batch = next(iter(feats.values())).shape[0]
    if method.startswith("nfn"):
        from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
        from nfn.layers import HNPLinear, NPLinear

        ws = WeightSpaceFeatures(
            [feats[f"{i}.weight"] for i in range(len(sizes) - 1)],
            [feats[f"{i}.bias"] for i in range(len(sizes) - 1)],
        )
        spec = network_spec_from_wsfeat(ws)
        layer = (NPLinear if method == "nfn NPLinear" else HNPLinear)(spec, channels, channels)

        def step():
            out = layer(ws)
            return sum(w.square().sum() for w in out.weights) + sum(
                b.square().sum() for b in out.biases
            )

    elif method.startswith("metanet UNF"):
        from metanet.nn import UNFLinear

        if "NP)" in method and "HNP" not in method:
            space = _np_space(sizes)
        else:
            space = from_state_dict({n: torch.zeros(feats[n].shape[2:]) for n in names}, "mlp")
        layer = UNFLinear(space, channels, channels, basis="nfn")

        def step():
            out = layer(feats)
            return sum(v.square().sum() for v in out.values())

    else:  # GMN
        from torch_geometric.data import Batch

        from metanet import to_graph
        from metanet.nn import GMN

        space = from_state_dict({n: torch.zeros(feats[n].shape[2:]) for n in names}, "mlp")
        graphs = [
            to_graph(space, {n: feats[n][b, 0].detach() for n in names}) for b in range(batch)
        ]
        gbatch = Batch.from_data_list(graphs)
        layer = GMN(gbatch.x.shape[1], gbatch.edge_attr.shape[1], hidden=channels * 2, layers=3)

        def step():
            return layer(gbatch).square().sum()

    return layer, step


def worker(config: str, methods: list[str], steps: int, seconds: float) -> list[dict]:
    """Time ``methods`` on the same weight batch, alternating step by step; the peak is
    the process's (meaningful with one method)."""
    sizes, batch, channels = CONFIGS[config]
    torch.manual_seed(0)
    feats = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        feats[f"{i}.weight"] = torch.randn(batch, channels, b, a, requires_grad=True)
        feats[f"{i}.bias"] = torch.randn(batch, channels, b, requires_grad=True)
    runs = [_layer_step(m, sizes, channels, feats) for m in methods]
    for _, step in runs:
        step().backward()  # warm-up
    base = rss_bytes("VmRSS")
    reset_peak()
    times: list[list[float]] = [[] for _ in runs]
    while len(times[0]) < steps and (len(times[0]) < 3 or sum(map(sum, times)) < seconds):
        for (layer, step), ts in zip(runs, times):
            t0 = time.perf_counter()
            layer.zero_grad(set_to_none=True)
            step().backward()
            ts.append(time.perf_counter() - t0)
    peak = rss_bytes("VmHWM") - base
    rows = []
    for method, ts in zip(methods, times):
        sec = sorted(ts)[len(ts) // 2]
        rows.append(
            {
                "config": config,
                "method": method,
                "seconds": sec,
                "per_s": batch / sec,
                "peak": peak,
                "steps": len(ts),
            }
        )
    return rows


# GMN holds a hidden state per weight: the 784-input MLP's 118k edges per network
# would need ~12 GB at this batch size, so it runs on the INR weights only
GMN_CONFIG = "inr 2-32-32-1"

METHODS = [
    ("nfn NPLinear", "metanet UNF (NP)"),
    ("nfn HNPLinear", "metanet UNF (HNP)"),
    (None, "metanet GMN"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per layer, at most")
    ap.add_argument(
        "--seconds", type=float, default=60.0, help="stop timing after this (3+ steps each)"
    )
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        config, *methods = args.worker
        print(json.dumps(worker(config, methods, args.steps, args.seconds)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")

    def run(config: str, methods: list[str], steps: int, environ: dict | None = None) -> list:
        cmd = [sys.executable, __file__, "--worker", config, *methods]
        cmd += ["--steps", str(steps), "--seconds", str(args.seconds)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=environ)
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = {}
    for config in CONFIGS:
        for pair in METHODS:
            methods = [m for m in pair if m is not None]
            if config != GMN_CONFIG and "metanet GMN" in methods:
                continue
            # time: one default process, the layer and its baseline alternating
            for row in run(config, methods, args.steps):
                rows[(config, row["method"])] = row
            # peak: one process per layer, glibc's adaptive mmap threshold pinned so
            # that freed buffers leave the resident set
            for method in methods:
                rows[(config, method)]["peak"] = run(config, [method], 3, env)[0]["peak"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, "
        f"median of up to {args.steps} steps per layer, alternating with its baseline"
    )
    print(
        "| weights (batch, channels) | layer | networks/s | peak MiB | speed vs nfn | memory vs nfn |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for config, (_sizes, batch, channels) in CONFIGS.items():
        for base, ours in METHODS:
            for method in (base, ours):
                if (config, method) not in rows:
                    continue
                r = rows[(config, method)]
                ratio_t = ratio_m = "–"
                if base is not None and method == ours:
                    b = rows[(config, base)]
                    ratio_t = f"{r['per_s'] / b['per_s']:.2f}×"
                    ratio_m = f"{r['peak'] / max(b['peak'], 1):.2f}×"
                rate = f"{r['per_s']:,.0f}" if r["per_s"] >= 100 else f"{r['per_s']:.1f}"
                print(
                    f"| {config} ({batch}, {channels}) | {method} | {rate} | "
                    f"{r['peak'] / 2**20:.1f} | {ratio_t} | {ratio_m} |"
                )


if __name__ == "__main__":
    main()
