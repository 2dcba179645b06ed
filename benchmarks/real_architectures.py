"""Parameter graphs and metanetwork layers on ImageNet-size architectures.

For each hand-written torchvision-size fixture (``tests/fixtures/large.py``: ViT-B/16,
Swin-T, DenseNet-121, ConvNeXt-T, ResNet-50, ShuffleNetV2-x0.5; random init), in a fresh
subprocess, one model at a time:

* the converter's symmetry checked on the model (``assert_function_preserved``, float64,
  one group element, error relative to the largest logit);
* ``to_graph``: time, peak memory (VmHWM above the resident size before the build) over
  the bytes of its output, and the bytes the previous layout (every edge padded to the
  widest kernel, one edge per neuron pair) would have needed: the baseline;
* ``UNFLinear(space, 1, 1, basis="nfn")``: build time and parameter count;
* UNF (that layer) and GMN (``hidden=8, layers=2``) forward + backward on a batch of 2
  networks: time and peak memory (above the batch graph, which is input). Graphs larger
  than the GMN's ``edge_chunk`` run edge-chunked (recomputed edge states, see
  :class:`metanet.nn.GMN`); where the estimated peak (bytes per edge,
  ``GMN_BYTES_PER_EDGE`` or the most measured on the models run before it, times the
  batch's edges) exceeds ``--max-gib``, the step is skipped with the estimate.

    python benchmarks/real_architectures.py [--models vit_b_16 ...] [--max-gib 12]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from _memory import reset_peak, rss_bytes  # noqa: E402

ORDER = ["shufflenet_v2_x0_5", "densenet121", "resnet50", "convnext_t", "swin_t", "vit_b_16"]
GMN_HIDDEN, GMN_LAYERS = 8, 2
# peak bytes per edge of a GMN(hidden=8, layers=2) step above the batch graph, before any
# model of the run is measured. Edge-chunked, the step holds one chunk's buffers (about
# GMN.CHUNK_BYTES) and per-node states: ResNet-50 peaked 12 MB above its 1 GB batch graph
# (0.2 bytes per edge); one pass held ~780 bytes per edge (DenseNet-121, before chunking)
GMN_BYTES_PER_EDGE = 8.0


def _peak(fn, *args):
    """``(fn(*args), seconds, peak bytes above the resident size before the call)``."""
    gc.collect()
    base = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start, rss_bytes("VmHWM") - base


def _padded_bytes(space) -> int:
    """The previous layout: one edge per neuron pair, every edge padded to the widest
    kernel (``edge_index`` int64 + float32 ``edge_attr``)."""
    sizes = {s.name: s.axis.size for s in space.neuron_sets.values()}
    edges = [t for t in space.tensors.values() if t.is_edge]
    pairs = sum(sizes[t.out_set] * sizes[t.in_set] for t in edges)
    pairs += sum(sizes[a] for a, _ in space.identities)
    widest = max(math.prod(t.tap_shape) for t in edges)
    return pairs * (16 + 4 * widest)


def _unf_step(layer, feats) -> None:
    out = layer(feats)
    sum(v.square().mean() for k, v in out.items() if k in feats).backward()


def measure(name: str, gmn_bytes_per_edge: float, max_gib: float) -> dict:
    from torch_geometric.data import Batch

    from converters import from_module
    from metanet import to_graph, to_weights
    from metanet.graph import feature_tensors
    from metanet.nn import GMN, UNFLinear
    from metanet.testing import assert_function_preserved
    from tests.fixtures.large import LARGE

    torch.set_num_threads(1)
    factory, inputs = LARGE[name]
    model = factory()
    x = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space, t_convert, _ = _peak(from_module, model, x)
    row: dict = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    row["convert_s"] = t_convert
    row["fn_err"] = assert_function_preserved(model, space, x, n=1, rtol=1e-9)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    graph, row["graph_s"], row["graph_peak"] = _peak(to_graph, space, sd)
    row["graph_bytes"] = sum(v.numel() * v.element_size() for _, v in graph if torch.is_tensor(v))
    row["padded_bytes"] = _padded_bytes(space)
    row["edges"], row["edge_dim"] = graph.edge_index.shape[1], graph.edge_attr.shape[1]
    back = to_weights(space, graph)
    row["exact"] = all(torch.equal(back[k], sd[k]) for k in space.tensors)
    del back

    torch.manual_seed(0)
    layer, row["unf_build_s"], _ = _peak(UNFLinear, space, 1, 1, "nfn")
    row["unf_params"] = sum(p.numel() for p in layer.parameters())
    gen = torch.Generator().manual_seed(1)
    feats = {
        n: torch.stack([sd[n], torch.randn(sd[n].shape, generator=gen) * sd[n].std()])[:, None]
        for n in feature_tensors(space)
    }

    _, row["unf_step_s"], row["unf_step_peak"] = _peak(_unf_step, layer, feats)
    del layer, feats
    gc.collect()

    edges2 = 2 * row["edges"]
    row["gmn_estimate"] = gmn_bytes_per_edge * edges2 + 2 * GMN.CHUNK_BYTES
    if row["gmn_estimate"] > max_gib * 2**30:
        row["gmn_step_s"] = row["gmn_step_peak"] = None
        return row
    other = dict(sd)
    for n in feature_tensors(space):
        other[n] = torch.randn(sd[n].shape, generator=gen) * sd[n].std()
    batch = Batch.from_data_list([graph, to_graph(space, other)])
    del graph, other
    torch.manual_seed(0)
    gmn = GMN(batch.x.shape[1], batch.edge_attr.shape[1], hidden=GMN_HIDDEN, layers=GMN_LAYERS)

    _, row["gmn_step_s"], row["gmn_step_peak"] = _peak(lambda: gmn(batch).sum().backward())
    row["gmn_bytes_per_edge"] = max(0, row["gmn_step_peak"] - 2 * GMN.CHUNK_BYTES) / edges2
    return row


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | params | fn preserved (rel. err) | to_graph (s) | graph (GiB) | peak / graph "
        "| padded layout (GiB) | nfn UNF build (s) | UNF params | UNF fwd+bwd B=2 (s / GiB) "
        "| GMN fwd+bwd B=2 (s / GiB) |"
    )
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        gmn = (
            f"{r['gmn_step_s']:.1f} / {_gib(r['gmn_step_peak'])}"
            if r.get("gmn_step_s") is not None
            else f"skipped: ~{_gib(r['gmn_estimate'])} GiB est."
        )
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['fn_err']:.1e} | {r['graph_s']:.2f} "
            f"| {_gib(r['graph_bytes'])} | {r['graph_peak'] / r['graph_bytes']:.2f} "
            f"| {_gib(r['padded_bytes'])} | {r['unf_build_s']:.1f} | {r['unf_params'] / 1e6:.2f}M "
            f"| {r['unf_step_s']:.1f} / {_gib(r['unf_step_peak'])} | {gmn} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=ORDER, choices=ORDER)
    p.add_argument("--max-gib", type=float, default=12.0, help="skip a GMN step above this")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument(
        "--gmn-bytes-per-edge", type=float, default=GMN_BYTES_PER_EDGE, help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.gmn_bytes_per_edge, args.max_gib)))
        return
    rows, per_edge = [], GMN_BYTES_PER_EDGE
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--max-gib", str(args.max_gib)]
        cmd += ["--gmn-bytes-per-edge", str(per_edge)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        per_edge = max(per_edge, row.get("gmn_bytes_per_edge", 0.0))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    ok_graph = all(r["graph_peak"] <= 2 * r["graph_bytes"] and r["exact"] for r in rows)
    ok_unf = all(r["unf_build_s"] < 30 and r["unf_params"] < r["params"] for r in rows)
    print(f"\nto_graph peak <= 2x output, exact round trip: {'yes' if ok_graph else 'NO'}")
    print(f"nfn UNFLinear < 30 s and fewer parameters than the model: {'yes' if ok_unf else 'NO'}")


if __name__ == "__main__":
    main()
