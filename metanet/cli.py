"""The ``metanet`` command line: the face that sits on the Python API.

Subcommands: ``inspect`` (summary of a checkpoint's WeightSpace), ``create`` (write a
randomly initialised network of a state-dict family with its WeightSpace), ``graph``
(parameter-graph statistics).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from metanet.graph import to_graph
from metanet.io import SPACE_KEY, CheckpointError, load, load_state_dict, save
from metanet.space import WeightSpaceError

__all__ = ["main"]


def _space_and_weights(path: str, family: str | None, activation: str | None, input_shape=None):
    """``(weights, space)`` of a checkpoint, an HF folder, or a ``module:factory``."""
    p = Path(path)
    if not p.exists() and ":" in path and family is None:
        return _from_factory(path, input_shape)
    if p.is_dir():
        from converters import load_pretrained

        return load_pretrained(p)
    if family is None:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(p), framework="pt") as f:
                    has_space = SPACE_KEY in (f.metadata() or {})
            except Exception:  # noqa: BLE001 - load() below reports the precise problem
                has_space = True
            if has_space:
                return load(p)
        raise CheckpointError(
            f"{p}: has no embedded WeightSpace; pass --family (mlp, siren, cnn) to describe it"
        )
    from converters import from_state_dict

    sd = load_state_dict(p)
    return sd, from_state_dict(sd, family, activation=activation)


def _from_factory(spec: str, input_shape: str | None):
    """``package.module:factory``: a callable returning a model, or (model, inputs)."""
    import importlib

    from converters import from_module

    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{spec}: cannot import the factory ({e})") from None
    made = factory()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if inputs is None:
        if not input_shape:
            raise CheckpointError(
                f"{spec}: the factory returned only a model; pass --input-shape (e.g. 1,3,32,32) "
                "or return (model, example_inputs)"
            )
        inputs = (torch.randn(*[int(n) for n in input_shape.split(",")]),)
    space = from_module(model, inputs)
    return {k: v.detach() for k, v in model.state_dict().items()}, space


def _cmd_inspect(args: argparse.Namespace) -> int:
    weights, space = _space_and_weights(args.path, args.family, args.activation, args.input_shape)
    if args.json:
        print(space.to_json(indent=2))
        return 0
    print(f"{args.path}")
    print(space.summary())
    if args.tensors:
        for t in space.tensors.values():
            axes = ", ".join(str(a) for a in t.axes)
            print(f"  {t.name:<40} {str(tuple(t.shape)):<18} [{axes}] {t.role}")
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    weights, space = _space_and_weights(args.path, args.family, args.activation, args.input_shape)
    start = time.perf_counter()
    graph = to_graph(space, weights)
    elapsed = time.perf_counter() - start
    e = graph.edge_index.shape[1]
    print(
        f"{args.path}: {graph.num_nodes:,} nodes, {e:,} edges, node features "
        f"{graph.x.shape[1]}, edge features {graph.edge_attr.shape[1]}; built in "
        f"{elapsed * 1e3:.1f} ms ({e / max(elapsed, 1e-9) / 1e6:.1f}M edges/s)"
    )
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from torch import nn

    from converters import from_state_dict

    torch.manual_seed(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if args.family in ("mlp", "siren"):
        sizes = sizes or [64, 128, 128, 10]
        model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    else:
        sizes = sizes or [3, 16, 32, 32, 10]
        convs = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            convs += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)]
        model = nn.Sequential(*convs, nn.Linear(sizes[-2], sizes[-1]))
    sd = model.state_dict()
    space = from_state_dict(sd, args.family)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise CheckpointError(f"{out}: exists; pass --force to overwrite")
    save(out, sd, space)
    print(f"wrote {out}: {args.family} {sizes}, {space.num_params:,} values")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metanet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def source(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "path", help="a metanet checkpoint, or a plain .safetensors/.pt with --family"
        )
        p.add_argument(
            "--family", choices=["mlp", "siren", "cnn"], help="describe a plain state dict"
        )
        p.add_argument("--activation", help="hidden activation of --family (default relu / sin)")
        p.add_argument("--input-shape", help="example input shape for a module:factory (randn)")

    p = sub.add_parser("inspect", help="print the WeightSpace summary of a checkpoint")
    source(p)
    p.add_argument("--json", action="store_true", help="print the WeightSpace as JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor and its axes")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("graph", help="build the parameter graph and print its size")
    source(p)
    p.set_defaults(run=_cmd_graph)

    p = sub.add_parser("create", help="write a random network of a family with its WeightSpace")
    p.add_argument("family", choices=["mlp", "siren", "cnn"])
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--sizes", help="comma-separated layer widths (cnn: in,conv...,classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(run=_cmd_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, WeightSpaceError) as e:
        print(f"metanet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
