"""Equivariant layer speed and memory: metanet's UNF layers vs the ``nfn`` package.

Same MLP weight batches, same channels, same batch size, forward + backward:

* ``NPLinear`` (nfn) vs ``UNFLinear`` on a space where input and output neurons are
  permutable too (NP);
* ``HNPLinear`` (nfn) vs ``UNFLinear`` on ``from_state_dict``'s space (inputs and outputs
  fixed, HNP);
* GMN per-graph throughput on the same networks' parameter graphs.

Each row runs in fresh processes: time is the median of repeated steps in a default
process; peak memory the resident-set high-water mark above the process's size before
the first step, measured with glibc's mmap threshold pinned (so freed buffers leave the
resident set and every allocation shows).

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


def worker(config: str, method: str, steps: int) -> dict:
    from converters import from_state_dict

    sizes, batch, channels = CONFIGS[config]
    torch.manual_seed(0)
    names = [f"{i}.{k}" for i in range(len(sizes) - 1) for k in ("weight", "bias")]
    shapes = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"{i}.weight"], shapes[f"{i}.bias"] = (b, a), (b,)
    feats = {n: torch.randn(batch, channels, *shapes[n], requires_grad=True) for n in names}

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
            space = from_state_dict({n: torch.zeros(shapes[n]) for n in names}, "mlp")
        layer = UNFLinear(space, channels, channels, basis="nfn")

        def step():
            out = layer(feats)
            return sum(v.square().sum() for v in out.values())

    else:  # GMN
        from torch_geometric.data import Batch

        from metanet import to_graph
        from metanet.nn import GMN

        space = from_state_dict({n: torch.zeros(shapes[n]) for n in names}, "mlp")
        graphs = [
            to_graph(space, {n: feats[n][b, 0].detach() for n in names}) for b in range(batch)
        ]
        gbatch = Batch.from_data_list(graphs)
        layer = GMN(gbatch.x.shape[1], gbatch.edge_attr.shape[1], hidden=channels * 2, layers=3)

        def step():
            return layer(gbatch).square().sum()

    step().backward()  # warm-up
    base = rss_bytes("VmRSS")
    reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        layer.zero_grad(set_to_none=True)
        step().backward()
        times.append(time.perf_counter() - t0)
    peak = rss_bytes("VmHWM") - base
    sec = sorted(times)[len(times) // 2]
    return {"config": config, "method": method, "seconds": sec, "per_s": batch / sec, "peak": peak}


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
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    rows = {}
    for config in CONFIGS:
        for pair in METHODS:
            for method in pair:
                if method is None or (method == "metanet GMN" and config != GMN_CONFIG):
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    config,
                    method,
                    "--steps",
                    str(args.steps),
                ]
                # time: a process as a user runs it; peak: with glibc's adaptive mmap
                # threshold pinned so that freed buffers leave the resident set
                timed = subprocess.run(cmd, check=True, capture_output=True, text=True)
                pinned = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                row = json.loads(timed.stdout.strip().splitlines()[-1])
                row["peak"] = json.loads(pinned.stdout.strip().splitlines()[-1])["peak"]
                rows[(config, method)] = row
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, median of {args.steps} steps"
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
                print(
                    f"| {config} ({batch}, {channels}) | {method} | {r['per_s']:,.0f} | "
                    f"{r['peak'] / 2**20:.1f} | {ratio_t} | {ratio_m} |"
                )


if __name__ == "__main__":
    main()
