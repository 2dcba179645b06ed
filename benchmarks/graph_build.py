"""Parameter-graph build speed and peak memory.

Builds the ParamGraph of an MLP with >= 10M parameters and of a CNN with >= 5M, with
``metanet.to_graph`` and with a naive ``repeat``/``repeat_interleave`` build (the
baseline, same run). Each method runs in fresh subprocesses: time is the median of
repeated builds in a default process; peak memory is the process's high-water mark
(VmHWM, reset through /proc/self/clear_refs) above its resident size before the build,
compared to the bytes of ``edge_index + edge_attr``.

``--samples N``: a dataset's graphs instead, one small network per sample as a weight
dataset builds them (``WeightDataset(format="graph")``): N graphs of different weights of
one space (the MNIST INRs' SIREN, the CNN zoo's CNN), each ``to_graph`` call timed, with
the space's structure kept between calls (the default) and rebuilt every call (the
previous ``to_graph``: nothing kept, nothing copied), interleaved in one process.

    python benchmarks/graph_build.py [--repeats 5]
    python benchmarks/graph_build.py --samples 2000
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
from torch import nn

MODELS = {
    "mlp-10M": ("mlp", [784, 2048, 2048, 2048, 10]),
    "cnn-5M": ("cnn", [3, 128, 256, 256, 512, 512, 512, 10]),
}


def make(kind: str, sizes: list[int]) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def naive_graph(space, weights):
    """The baseline: per-tensor repeat/repeat_interleave indices and concatenation."""
    sets = space.neuron_sets
    offset, n = {}, 0
    for s in sets.values():
        offset[s.name] = n
        n += s.axis.size
    taps = max(
        t.tap_shape and int(torch.tensor(t.tap_shape).prod()) or 1
        for t in space.tensors.values()
        if t.is_edge
    )
    idx, attrs = [], []
    for t in space.tensors.values():
        if not t.is_edge:
            continue
        w = weights[t.name]
        n_out, n_in = w.shape[0], w.shape[1]
        src = torch.arange(n_in).repeat(n_out) + offset[t.in_set]
        dst = torch.arange(n_out).repeat_interleave(n_in) + offset[t.out_set]
        idx.append(torch.stack([src, dst]))
        a = w.reshape(n_out * n_in, -1)
        attrs.append(torch.nn.functional.pad(a, (0, taps - a.shape[1])))
    return torch.cat(idx, dim=1), torch.cat(attrs)


def worker(model: str, method: str, repeats: int) -> dict:
    from converters import from_state_dict
    from metanet import to_graph

    kind, sizes = MODELS[model]
    sd = make(kind, sizes).state_dict()
    space = from_state_dict(sd, kind)
    build = (
        (lambda: to_graph(space, sd)) if method == "metanet" else (lambda: naive_graph(space, sd))
    )
    build()  # warm up allocator and kernels
    times, peaks = [], []
    for _ in range(repeats):
        import gc

        gc.collect()
        base = rss_bytes("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        out = build()
        times.append(time.perf_counter() - t0)
        peaks.append(rss_bytes("VmHWM") - base)
        if method == "metanet":
            ei, ea = out.edge_index, out.edge_attr
        else:
            ei, ea = out
        del out
    edges = ei.shape[1]
    target = ei.numel() * ei.element_size() + ea.numel() * ea.element_size()
    return {
        "model": model,
        "method": method,
        "params": space.num_params,
        "edges": edges,
        "seconds": sorted(times)[len(times) // 2],
        "peak_bytes": sorted(peaks)[len(peaks) // 2],
        "target_bytes": target,
    }


def samples(n: int) -> None:
    """Per-sample build time of a dataset's graphs: structure kept vs rebuilt."""
    from metanet import graph
    from tasks.datasets.inr import siren_space
    from tasks.datasets.zoo import zoo_space

    torch.set_num_threads(1)
    spaces = {"MNIST INR (SIREN 2-32-32-1)": siren_space(), "CNN zoo (`zoo_cnn`)": zoo_space()}
    print(f"torch {torch.__version__}, 1 thread, {n} graphs per space and method, interleaved")
    print(
        "| space | edges | structure rebuilt (µs / graph) | structure kept (µs / graph) | speedup |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, space in spaces.items():
        gen = torch.Generator().manual_seed(0)
        weights = [
            {k: torch.randn(t.shape, generator=gen) for k, t in space.tensors.items()}
            for _ in range(n)
        ]
        times = {"rebuilt": [], "kept": []}
        graph.to_graph(space, weights[0])  # warm up
        bound = graph._CACHED_EDGES
        for w in weights:
            for how in ("rebuilt", "kept"):
                # rebuilt: the space's entry set aside and nothing kept, so the structure
                # is built and handed over as the previous to_graph did (no copy)
                if how == "rebuilt":
                    graph._CACHED_EDGES, kept = -1, graph._SKELETONS.pop(id(space))
                t0 = time.perf_counter()
                g = graph.to_graph(space, w)
                times[how].append(time.perf_counter() - t0)
                if how == "rebuilt":
                    graph._CACHED_EDGES, graph._SKELETONS[id(space)] = bound, kept
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(
            f"| {label} | {g.edge_index.shape[1]:,} | {med['rebuilt'] * 1e6:.0f} | "
            f"{med['kept'] * 1e6:.0f} | {med['rebuilt'] / med['kept']:.2f}× |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=0, help="a dataset's graphs (see above)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats)))
        return
    if args.samples:
        samples(args.samples)
        return
    rows = []
    for model in MODELS:
        for method in ("metanet", "naive"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                model,
                method,
                "--repeats",
                str(args.repeats),
            ]
            # time: the process as a user runs it. Peak: with glibc's adaptive mmap
            # threshold pinned, so freed buffers go back to the OS and every allocation
            # of the build shows in the resident-size high-water mark.
            timed = subprocess.run(cmd, check=True, capture_output=True, text=True)
            pinned = dict(
                os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072"
            )
            peak = subprocess.run(cmd, check=True, capture_output=True, text=True, env=pinned)
            row = json.loads(timed.stdout.strip().splitlines()[-1])
            row["peak_bytes"] = json.loads(peak.stdout.strip().splitlines()[-1])["peak_bytes"]
            rows.append(row)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, median of {args.repeats}"
    )
    print(
        "| model | params | edges | method | time (ms) | M edges/s | peak / (edge_index+edge_attr) | speedup vs naive |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for model in MODELS:
        ours, naive = (
            next(r for r in rows if r["model"] == model and r["method"] == m)
            for m in ("metanet", "naive")
        )
        for r in (ours, naive):
            print(
                f"| {model} | {r['params'] / 1e6:.1f}M | {r['edges'] / 1e6:.2f}M | {r['method']} | "
                f"{r['seconds'] * 1e3:.1f} | {r['edges'] / r['seconds'] / 1e6:.0f} | "
                f"{r['peak_bytes'] / r['target_bytes']:.2f}× | "
                f"{naive['seconds'] / r['seconds']:.2f}× |"
            )


if __name__ == "__main__":
    main()
