"""The ``metanet`` command line: the face that sits on the Python API.

Subcommands: ``inspect`` (summary of a checkpoint's WeightSpace), ``create`` (write a
randomly initialised network of a state-dict family with its WeightSpace), ``graph``
(parameter-graph statistics), ``align`` / ``merge`` / ``barrier`` (Git Re-Basin on saved
checkpoints or Hugging Face folders).
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _imported(spec: str, what: str):
    """The object named by ``package.module:attr``, or a CheckpointError saying why not."""
    import importlib

    mod_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{what} {spec}: cannot import ({e})") from None


def _factory_model(spec: str, input_shape: str | None):
    """``package.module:factory`` -> ``(model, example inputs or None)``; the factory
    returns a model or ``(model, example_inputs)``; ``input_shape`` makes randn inputs."""
    made = _imported(spec, "factory")()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if inputs is None and input_shape:
        inputs = (torch.randn(*[int(n) for n in input_shape.split(",")]),)
    return model.eval(), inputs


def _from_factory(spec: str, input_shape: str | None):
    """``(weights, space)`` of the model a ``package.module:factory`` builds."""
    from converters import from_module

    model, inputs = _factory_model(spec, input_shape)
    if inputs is None:
        raise CheckpointError(
            f"{spec}: the factory returned only a model; pass --input-shape (e.g. 1,3,32,32) "
            "or return (model, example_inputs)"
        )
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


# --------------------------------------------------------------------------- align & merge
class _Checkpoint:
    """One input of align/merge/barrier: weights, space, and the model when one is at hand."""

    def __init__(self, path: str, args: argparse.Namespace):
        self.path = Path(path)
        self.model = self.inputs = None
        self.hf = self.path.is_dir()
        if self.hf:
            from converters import from_module
            from converters.pretrained import hf_model

            self.model, self.inputs = hf_model(self.path)
            self.space = from_module(self.model, self.inputs)
            # a copy: writing an output loads into this model, which must not alter inputs
            self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.weights, self.space = _space_and_weights(path, args.family, args.activation)
        if getattr(args, "model", None) and self.model is None:
            self.model, self.inputs = _factory_model(args.model, args.input_shape)


def _load_all(paths: Sequence[str], args: argparse.Namespace) -> list[_Checkpoint]:
    from tasks.align import AlignmentError, check_same_architecture

    cks = [_Checkpoint(p, args) for p in paths]
    first = cks[0]
    for ck in cks[1:]:
        try:
            check_same_architecture(first.space, first.weights, ck.weights)
        except AlignmentError as e:
            raise AlignmentError(f"{first.path} and {ck.path} differ: {e}") from None
        if ck.space != first.space:
            raise AlignmentError(
                f"{first.path} and {ck.path} have the same tensors but different symmetry "
                "(WeightSpaces differ); were they converted with different settings?"
            )
    return cks


def _check_output(out: Path, inputs: Sequence[_Checkpoint], force: bool) -> None:
    for ck in inputs:
        if out.resolve() == ck.path.resolve():
            raise CheckpointError(f"{out}: is an input; write the result somewhere else")
    if out.exists() and not force:
        raise CheckpointError(f"{out}: exists; pass --force to overwrite")


def _write(out: Path, weights: dict, ref: _Checkpoint) -> None:
    """A metanet checkpoint, or (for Hugging Face inputs) a Hugging Face folder.

    Both are written beside the target and renamed into place, so a failure leaves no
    partial output.
    """
    import shutil
    import tempfile

    from metanet.io import save

    if not ref.hf:
        save(out, weights, ref.space)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ref.model.load_state_dict(weights)
        ref.model.save_pretrained(str(tmp), safe_serialization=True)
        for f in ref.path.iterdir():  # tokenizer and friends
            if f.is_file() and not (tmp / f.name).exists() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _match(ref: _Checkpoint, other: _Checkpoint, args, log) -> tuple[dict, str]:
    """The element permuting ``other`` to ``ref`` by ``args.match``, and a summary."""
    import copy

    from tasks.align import activation_matching, ste_matching, weight_matching

    method = getattr(args, "match", "weight")
    if method == "weight":
        g = weight_matching(
            ref.space,
            ref.weights,
            other.weights,
            seed=args.seed,
            max_sweeps=args.max_sweeps,
            progress=not args.quiet,
            log=log,
        )
        return (
            g,
            f"{log.sweeps} sweeps, objective {log.objective[0]:.4g} -> {log.objective[-1]:.4g}",
        )
    model = other.model or ref.model
    if model is None:
        raise CheckpointError(
            f"--match {method} runs the model: pass --model package.module:factory"
        )
    data = _data(args.match_data, other.path, split="train", flag="--match-data")
    if method == "activation":
        pair = []
        for w in (ref.weights, other.weights):
            m = copy.deepcopy(model)
            m.load_state_dict(w)
            pair.append(m)
        g = activation_matching(*pair, ref.space, data, seed=args.seed, log=log)
        return g, f"activation matching on {len(data)} batches"
    g = ste_matching(
        model,
        ref.space,
        ref.weights,
        other.weights,
        data,
        epochs=args.ste_epochs,
        lr=args.ste_lr,
        seed=args.seed,
        init="activation",
        progress=not args.quiet,
        log=log,
    )
    return g, (
        f"STE from activation matching, {args.ste_epochs} epochs on {len(data)} batches, "
        f"midpoint loss {log.objective[0]:.4g} -> {log.objective[-1]:.4g}"
        if log.objective
        else f"STE from activation matching, {args.ste_epochs} epochs"
    )


def _aligned(ref: _Checkpoint, other: _Checkpoint, args) -> tuple[dict, dict]:
    """Match ``other`` to ``ref`` (``--match``); the result is checked before it is returned."""
    from tasks.align import AlignmentError, MatchLog, verify_aligned

    log = MatchLog()
    g, summary = _match(ref, other, args, log)
    aligned = ref.space.apply(other.weights, g)
    back = ref.space.apply(aligned, ref.space.invert(g))
    bad = next((k for k in other.weights if not torch.equal(back[k], other.weights[k])), None)
    if bad is not None:
        raise AlignmentError(f"aligned tensor {bad!r} is not a relabelling of {other.path}")
    checked = ""
    model = other.model or ref.model
    if model is not None and (other.inputs or ref.inputs) is not None:
        err = verify_aligned(model, other.weights, aligned, other.inputs or ref.inputs)
        checked = f"; same function as {other.path.name} (max rel. error {err:.1e})"
    moved = sum(int((v != torch.arange(v.shape[-1])).any()) for v in g.values())
    if not args.quiet:
        print(
            f"aligned {other.path} to {ref.path}: {moved}/{len(g)} groups permuted, "
            f"{summary}, {log.seconds:.2f} s{checked}",
            file=sys.stderr,
        )
    return aligned, g


def _cmd_align(args: argparse.Namespace) -> int:
    out = Path(args.output)
    a, b = _load_all([args.a, args.b], args)
    _check_output(out, [a, b], args.force)
    aligned, _ = _aligned(a, b, args)
    _write(out, aligned, b)
    print(f"wrote {out}: {b.path} aligned to {a.path}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from tasks import merge

    out = Path(args.output)
    cks = _load_all(args.paths, args)
    _check_output(out, cks, args.force)
    ref = cks[0]
    method = args.method or ("align" if len(cks) == 2 else "mergemany")
    if method == "naive":
        coef = [1 - args.alpha, args.alpha] if len(cks) == 2 else None
        merged = merge.average([c.weights for c in cks], coef)
    elif method == "align":
        if len(cks) != 2:
            raise CheckpointError("--method align merges two checkpoints; use mergemany")
        aligned, _ = _aligned(ref, cks[1], args)
        merged = merge.interpolate(ref.weights, aligned, args.alpha)
    elif method == "mergemany":
        merged, _ = merge.merge_many(
            [c.weights for c in cks], ref.space, seed=args.seed, progress=not args.quiet
        )
    else:  # task arithmetic / TIES: the first checkpoint is the base
        if len(cks) < 2:
            raise CheckpointError(f"--method {method} needs a base and fine-tuned checkpoints")
        tuned = (
            [_aligned(ref, c, args)[0] for c in cks[1:]]
            if args.align
            else [c.weights for c in cks[1:]]
        )
        if method == "ties":
            merged = merge.ties_merge(ref.weights, tuned, density=args.density, scale=args.scale)
        else:
            merged = merge.task_arithmetic(ref.weights, tuned, scale=args.scale)
    _write(out, merged, ref)
    print(f"wrote {out}: {method} merge of {len(cks)} checkpoints")
    return 0


def _data(spec: str | None, model_path: Path, split: str = "test", flag: str = "--data"):
    """Batches of ``(inputs, targets)``: digits' test (or train) split, or a function's."""
    if spec is None:
        what = "barrier of" if flag == "--data" else "matching"
        raise CheckpointError(
            f"{what} {model_path}: pass {flag} (digits, digits-flat, or module:function "
            "returning a list of (inputs, targets) batches)"
        )
    if spec in ("digits", "digits-flat"):
        from tasks import digits

        d = digits.load()
        d = d.flat() if spec == "digits-flat" else d
        if split == "train":
            return digits.batches(d.x_train, d.y_train, 128)
        return digits.batches(d.x_test, d.y_test)
    return list(_imported(spec, flag)())


def _cmd_barrier(args: argparse.Namespace) -> int:
    from tasks.merge import evaluator, loss_barrier, plot_barriers

    a, b = _load_all([args.a, args.b], args)
    if a.model is None:
        raise CheckpointError(
            f"{a.path}: no model to evaluate; pass --model package.module:factory"
        )
    evaluate = evaluator(a.model, _data(args.data, a.path), accuracy=True)
    curves = {"naive": loss_barrier(evaluate, a.weights, b.weights, alphas=args.alphas)}
    if not args.no_align:
        aligned, _ = _aligned(a, b, args)
        curves["aligned"] = loss_barrier(evaluate, a.weights, aligned, alphas=args.alphas)
    print("| alpha | " + " | ".join(f"{k} loss | {k} acc." for k in curves) + " |")
    print("|---:|" + "---:|---:|" * len(curves))
    first = next(iter(curves.values()))
    for i, alpha in enumerate(first.alphas):
        cells = [f"{c.losses[i]:.4f} | {c.extra['metric1'][i]:.4f}" for c in curves.values()]
        print(f"| {alpha:.2f} | " + " | ".join(cells) + " |")
    for k, c in curves.items():
        print(f"{k}: barrier {c.barrier:.4f} (midpoint {c.midpoint:.4f})")
    if args.plot:
        plot_barriers(curves, args.plot, title=f"{a.path.name} → {b.path.name}")
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------- datasets
def _cmd_inr(args: argparse.Namespace) -> int:
    from tasks import inr

    if args.action == "info":
        ds = inr.WeightDataset(args.out)
        psnr = ds.psnr
        splits = {s: sum(r["split"] == s for r in ds.rows) for s in ("train", "val", "test")}
        print(
            f"{args.out}: {len(ds):,} INRs ({', '.join(f'{k} {v:,}' for k, v in splits.items())}), "
            f"PSNR mean {psnr.mean():.2f} dB (min {psnr.min():.2f}, median {psnr.median():.2f})"
        )
        return 0
    shard = None
    if args.shard:
        i, _, n = args.shard.partition("/")
        shard = (int(i), int(n))
    given = {
        "hidden": args.width, "depth": args.depth, "steps": args.steps, "lr": args.lr,
        "w0": args.w0, "variant": args.variant, "target_psnr": args.target_psnr,
    }  # fmt: skip
    cfg = inr.INRConfig(**{k: v for k, v in given.items() if v is not None})
    if cfg.target_psnr == 0:
        cfg = dataclasses.replace(cfg, target_psnr=None)
    num_shards = shard[1] if shard else args.num_shards
    paths = inr.make_dataset(
        args.out,
        per_image=args.per_image,
        cfg=cfg,
        resolution=args.resolution,
        shard=shard,
        num_shards=num_shards,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"{args.out}: {len(paths)} shard(s) present")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from tasks import zoo

    shard = None
    if args.shard:
        i, _, n = args.shard.partition("/")
        shard = (int(i), int(n))
    paths = zoo.make_zoo(
        args.out,
        args.n,
        seed=args.seed,
        shard=shard,
        num_shards=shard[1] if shard else args.num_shards,
        max_steps=args.max_steps,
        progress=not args.quiet,
    )
    print(f"{args.out}: {len(paths)} shard(s) present")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tasks.train import train

    r = train(
        args.kind,
        args.dataset,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        seed=args.seed,
        augment=not args.no_augment,
        limit=args.limit,
        progress=not args.quiet,
        frequencies=args.frequencies,
        schedule=args.schedule,
        target=args.target,
        canonicalize=args.canonicalize,
        flip_signs=args.flip_signs,
    )
    if r.world_size == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        if args.target == "accuracy":
            score = f"test Kendall tau {r.test_kendall_tau:.4f}, val {r.val_kendall_tau:.4f}"
        else:
            score = f"test accuracy {r.test_accuracy:.4f}, val {r.val_accuracy:.4f}"
        print(
            f"{args.kind}: {score}, {r.seconds:.1f} s on {r.world_size} process(es); "
            f"outputs in {args.out}"
        )
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

    def pair(p: argparse.ArgumentParser, many: bool = False) -> None:
        if many:
            p.add_argument(
                "paths",
                nargs="+",
                metavar="CHECKPOINT",
                help="metanet checkpoints or Hugging Face folders (first = reference)",
            )
        else:
            p.add_argument("a", help="reference checkpoint (metanet .safetensors or HF folder)")
            p.add_argument("b", help="checkpoint to align to a")
        p.add_argument("--family", choices=["mlp", "siren", "cnn"], help="plain state dicts")
        p.add_argument("--activation", help="hidden activation of --family")
        p.add_argument(
            "--model",
            help="package.module:factory building the architecture "
            "(verifies the aligned function; needed by barrier for non-HF inputs)",
        )
        p.add_argument("--input-shape", help="example input shape for --model (randn)")
        p.add_argument("--seed", type=int, default=0, help="group order of weight matching")
        p.add_argument("--max-sweeps", type=int, default=100)
        p.add_argument(
            "--match",
            choices=["weight", "activation", "ste"],
            default="weight",
            help="how B is permuted: weight matching (default: data-free, fast, best on "
            "MLPs/CNNs), activation matching, or the straight-through estimator started "
            "from activation matching (runs --model on --match-data; far lower barriers "
            "on transformers)",
        )
        p.add_argument(
            "--match-data",
            help="--match activation/ste: digits, digits-flat (training split) or "
            "package.module:function -> (inputs, targets) batches",
        )
        p.add_argument("--ste-epochs", type=int, default=10, help="--match ste: epochs")
        p.add_argument("--ste-lr", type=float, default=1e-2, help="--match ste: Adam lr")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("align", help="permute B to match A (Git Re-Basin weight matching)")
    pair(p)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(run=_cmd_align)

    p = sub.add_parser("merge", help="merge checkpoints (aligned interpolation, MergeMany, TIES)")
    pair(p, many=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--method",
        choices=["align", "naive", "mergemany", "ties", "task"],
        help="default: align for two checkpoints, mergemany for more",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the second checkpoint")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of entries kept")
    p.add_argument("--scale", type=float, default=1.0, help="TIES / task: task-vector scale")
    p.add_argument("--align", action="store_true", help="TIES / task: align to the base first")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(run=_cmd_merge)

    p = sub.add_parser("barrier", help="loss along the line from A to B, naive and aligned")
    pair(p)
    p.add_argument("--data", help="digits, digits-flat, or package.module:function -> batches")
    p.add_argument("--alphas", type=int, default=11)
    p.add_argument("--no-align", action="store_true", help="only the naive interpolation")
    p.add_argument("--plot", help="save the curves to this image")
    p.set_defaults(run=_cmd_barrier)

    p = sub.add_parser("inr", help="INR weight datasets: fit SIRENs to sklearn digits, or info")
    p.add_argument("action", choices=["make", "info"])
    p.add_argument("out", help="dataset folder")
    p.add_argument("--per-image", type=int, default=10, help="INRs per image (seeds)")
    p.add_argument("--shard", help="i/n: make only shard i of n (shards run anywhere)")
    p.add_argument("--num-shards", type=int, default=10)
    p.add_argument("--resolution", type=int, default=8, help="8 = native; 28 upsamples")
    # defaults: tasks.inr.INRConfig (the DWSNets recipe), read there so the two agree
    p.add_argument("--width", type=int, help="hidden width (default 32)")
    p.add_argument("--depth", type=int, help="hidden layers (default 2)")
    p.add_argument("--steps", type=int, help="most fitting steps (default 1000)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 5e-4)")
    p.add_argument("--w0", type=float, help="sine frequency factor (default 30)")
    p.add_argument("--variant", choices=["siren", "dws"], help="init (default dws)")
    p.add_argument(
        "--target-psnr", type=float, help="stop each INR at this PSNR; 0: never (default 40)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(run=_cmd_inr)

    p = sub.add_parser("zoo", help="CNN zoo: train small CNNs on sklearn digits (tasks.zoo)")
    p.add_argument("action", choices=["make"])
    p.add_argument("out", help="dataset folder")
    p.add_argument("--n", type=int, default=1000, help="number of CNNs")
    p.add_argument("--shard", help="i/n: make only shard i of n (shards run anywhere)")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--max-steps", type=int, help="cap every CNN's training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(run=_cmd_zoo)

    p = sub.add_parser("train", help="train a metanetwork on an INR dataset (torchrun: DDP)")
    p.add_argument(
        "kind",
        choices=["unf", "nfn", "gmn", "statnn", "flat", "nfn-np", "nfn-hnp"],
        help="nfn-np / nfn-hnp: the nfn package's classifiers (pip install nfn)",
    )
    p.add_argument("dataset", help="folder made by metanet inr make")
    p.add_argument("--out", default="train_out")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="at most this many training INRs")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--frequencies", type=int, default=0, help="Fourier-encode the weights")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument(
        "--canonicalize",
        action="store_true",
        help="feed the sign canonical form of the weights (odd activations: sin, tanh)",
    )
    p.add_argument(
        "--flip-signs",
        action="store_true",
        help="augment with random sign flips of odd-activation neurons too (every model)",
    )
    p.add_argument(
        "--target",
        choices=["label", "accuracy"],
        default="label",
        help="accuracy: regress each network's stored test accuracy (a zoo), Kendall tau",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(run=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, WeightSpaceError, OSError) as e:
        print(f"metanet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
