"""The ``metanet`` command line: the face that sits on the Python API.

Subcommands: ``inspect`` (summary of a checkpoint's WeightSpace), ``create`` (write a
randomly initialised network of a state-dict family with its WeightSpace), ``graph``
(parameter-graph statistics), ``align`` / ``merge`` / ``barrier`` (Git Re-Basin on saved
checkpoints or Hugging Face folders), ``inr`` / ``zoo`` / ``datasets import`` (weight
datasets: made here or imported from published releases) and ``train`` (metanetworks on
them).

Bad input is reported, not traced: every check a command can make before it starts
working is made first, and a failure prints one line naming the file, tensor or flag,
writes nothing and exits with status 2. Only the subcommand that runs imports torch, so
``metanet --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from metanet import __version__

__all__ = ["main", "build_parser", "UsageError"]

DESCRIPTION = (
    "metanet: learning on and with neural network weights. Inspect a checkpoint's "
    "WeightSpace (its parameters and their permutation symmetries), build its parameter "
    "graph, align and merge networks (Git Re-Basin), make weight datasets and train "
    "metanetworks on them. 'metanet COMMAND --help' lists a command's options."
)
FAMILIES = ("mlp", "siren", "cnn")
# metanet train's model kinds (tasks.learn.train.build_model), with what each one is
TRAIN_KINDS = {
    "unf": "UNF layers (metanet, full basis of equivariant maps)",
    "nfn": "metanet's UNF layers restricted to NFN's cheaper basis",
    "gmn": "graph metanetwork on parameter graphs",
    "transformer": "transformer over parameter-graph tokens (neurons; weights as attention biases)",
    "scalegmn": "graph metanetwork equivariant to sign flips and positive scaling too",
    "statnn": "per-tensor weight statistics + MLP",
    "flat": "MLP on the flattened weights (no symmetry; permutation augmentation)",
    "nfn-np": "the nfn package's NP classifier (pip install nfn)",
    "nfn-hnp": "the nfn package's HNP classifier (pip install nfn)",
}


class UsageError(Exception):
    """A flag or argument that cannot work; the message names it and what to pass."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (exit 2, one line), not a bug in metanet.

    Looked up when a command fails: a module that was never imported cannot have raised
    its error, so this costs no import.
    """
    found = [UsageError, OSError]
    for module, name in (
        ("metanet.io", "CheckpointError"),
        ("metanet.space", "WeightSpaceError"),
        ("converters.module", "ConverterError"),
        ("tasks.checkpoints.stream", "NonFiniteError"),
        ("tasks.learn.train", "TrainingDiverged"),
    ):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


# --------------------------------------------------------------------------- inputs
def _int_list(text: str) -> list[int]:
    """argparse type: ``"8,64"`` -> ``[8, 64]``."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers, e.g. 8,64"
        ) from None
    if any(n <= 0 for n in values):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive")
    return values


def _finite(text: str) -> float:
    """argparse type: a finite number (NaN/inf would merge into an all-NaN checkpoint)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be finite")
    return value


def _positive(text: str) -> int:
    """argparse type: a positive integer (a size, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _nonneg(text: str) -> int:
    """argparse type: an integer >= 0 (a seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def _activation(text: str) -> str:
    """argparse type: an activation name :func:`converters.activation_action` knows (a
    misspelt one would silently drop the hidden units' scaling or sign symmetry)."""
    from converters.state_dict import KNOWN_ACTIVATIONS

    if text.lower().replace("-", "_") not in KNOWN_ACTIVATIONS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown activation (known: {', '.join(sorted(KNOWN_ACTIVATIONS))})"
        )
    return text


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate, a frequency)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def _fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (a share of entries kept)."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must lie in (0, 1]")
    return value


def _device(args: argparse.Namespace):
    """``--device auto|cpu|cuda`` as a torch device, checked before any work: cuda on a
    machine without one is refused (one line, exit 2)."""
    import torch

    spec = getattr(args, "device", None) or "cpu"
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}); "
            "use --device cpu or auto"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def _shard(text: str) -> tuple[int, int]:
    """argparse type: ``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(i), int(n)


def _imported(spec: str, flag: str) -> Any:
    """The object a ``module:attr`` spec names, or a UsageError naming ``flag``.

    The current folder is importable (appended to ``sys.path``: an installed package of
    the same name wins), so ``mymodel:factory`` finds ``./mymodel.py`` from the console
    script as it does under ``python -m``.
    """
    import importlib

    mod_name, sep, attr = spec.partition(":")
    if not (sep and mod_name and attr):
        raise UsageError(
            f"{flag} {spec!r}: expected module:function, e.g. tasks.datasets.digits:mlp"
        )
    try:
        with _cwd_importable():
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(
            f"{flag} {spec}: cannot import {mod_name} ({e}); it must be installed or a "
            "module in the current folder"
        ) from None
    if not hasattr(module, attr):
        raise UsageError(f"{flag} {spec}: {mod_name} has no attribute {attr!r}")
    return getattr(module, attr)


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current folder importable (appended to ``sys.path``) for the body only: a
    folder here named like a module torch probes later (``z3``) must not shadow it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _called(spec: str, flag: str) -> Any:
    """What the user's ``module:function`` returns; an exception it raises is reported
    as bad input naming the flag (one line, exit 2), not as metanet's traceback."""
    with _cwd_importable():  # the function may import its neighbours when called
        fn = _imported(spec, flag)
        try:
            return fn()
        except Exception as e:
            raise UsageError(f"{flag} {spec}: raised {type(e).__name__}: {e}") from None


_MAX_INPUT_VALUES = 100_000_000  # an example input traces the model; it needs no more
_MAX_RESOLUTION = 4096  # inr make's side: 16.8M pixels per image


def _factory_model(spec: str, input_shape: list[int] | None, flag: str):
    """``module:factory`` -> ``(model, example inputs or None)``. The factory returns a
    model or ``(model, example_inputs)``; ``input_shape`` makes randn inputs instead."""
    import torch

    made = _called(spec, flag)
    if isinstance(made, tuple) and len(made) != 2:
        raise UsageError(
            f"{flag} {spec}: returned a tuple of {len(made)}; expected a model or a "
            "(model, example_inputs) pair"
        )
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"{flag} {spec}: returned a {type(model).__name__}, not a torch.nn.Module "
            "(or a (module, example_inputs) pair)"
        )
    if input_shape:
        if math.prod(input_shape) > _MAX_INPUT_VALUES:
            raise UsageError(
                f"--input-shape {','.join(map(str, input_shape))}: {math.prod(input_shape):,} "
                f"values, over the {_MAX_INPUT_VALUES:,} an example input may hold"
            )
        inputs = (torch.randn(*input_shape),)
    elif inputs is not None and not isinstance(inputs, tuple):
        inputs = (inputs,)
    if inputs is not None:
        where = f"--input-shape {','.join(map(str, input_shape))}" if input_shape else "its inputs"
        _check_runs(model.eval(), inputs, f"{flag} {spec} does not run on {where}")
    return model.eval(), inputs


def _check_runs(model, inputs: tuple, what: str):
    """Run ``model`` once on ``inputs`` (its output returned); a failure becomes a
    UsageError saying ``what``."""
    import torch

    try:
        with torch.no_grad():
            return model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if hasattr(x, "shape"))
        raise UsageError(f"{what} (input shape {shapes}): {e}") from None


def _space_and_weights(path: str, family: str | None, activation: str | None, input_shape=None):
    """``(weights, space)`` of a checkpoint, a Hugging Face folder, or a ``module:factory``."""
    if not Path(path).exists() and ":" in path:
        return _from_factory(path, input_shape)
    from tasks.checkpoints import load_checkpoint

    ck = load_checkpoint(path, family=family, activation=activation)
    return ck.weights, ck.space


def _from_factory(spec: str, input_shape: list[int] | None):
    """``(weights, space)`` of the model a ``module:factory`` builds."""
    from converters import from_module

    model, inputs = _factory_model(spec, input_shape, "factory")
    if inputs is None:
        raise UsageError(
            f"{spec}: the factory returned only a model; pass --input-shape (e.g. 1,3,32,32) "
            "or return (model, example_inputs)"
        )
    space = from_module(model, inputs)
    return {k: v.detach() for k, v in model.state_dict().items()}, space


def _check_output(
    out: Path,
    inputs: Sequence[str | Path],
    force: bool,
    folder: bool,
    suffixes: Sequence[str] = (".safetensors",),
    flag: str = "-o",
) -> None:
    """Refuse, before any work, an output that would overwrite an input, an existing file
    without ``--force``, a file where a folder is written (or the reverse), a file whose
    suffix is not one of ``suffixes`` (a ``.pt`` name on safetensors bytes could not be
    read back), or a place that cannot be written."""
    for p in inputs:
        if out.resolve() == Path(p).resolve():
            raise UsageError(f"{out}: is an input; write the result somewhere else")
        if Path(p).is_dir() and Path(p).resolve() in out.resolve().parents:
            raise UsageError(f"{out}: is inside the input {p}; write the result somewhere else")
        if out.resolve() in Path(p).resolve().parents:
            # --force would move the old output aside and delete it, inputs included
            raise UsageError(f"{out}: holds the input {p}; write the result somewhere else")
    if out.exists():
        if not force:
            raise UsageError(f"{out}: exists; pass --force to overwrite")
        if out.is_dir() and not folder:
            raise UsageError(
                f"{out}: is a folder, and the result is one {suffixes[0]} file; pass a file path"
            )
    if not folder and out.suffix.lower() not in suffixes:
        ends = suffixes[0] if len(suffixes) == 1 else f"one of {', '.join(sorted(suffixes))}"
        raise UsageError(f"{flag} {out}: the file this writes must end in {ends}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{out}: cannot be written ({parent} is not a writable folder)")


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
    from metanet.graph import to_graph

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


_CREATE_LIMIT = 100_000_000  # values: 400 MB of float32


def _cmd_create(args: argparse.Namespace) -> int:
    out = Path(args.output)
    _check_output(out, [], args.force, folder=False)
    least = 3 if args.family == "cnn" else 2
    if args.sizes and len(args.sizes) < least:
        raise UsageError(
            f"--sizes {','.join(map(str, args.sizes))}: a {args.family} needs at least {least} "
            + ("sizes (in,conv...,classes)" if args.family == "cnn" else "layer widths")
        )
    if args.sizes:
        n = sum(a * b + b for a, b in zip(args.sizes[:-1], args.sizes[1:]))
        if args.family == "cnn":
            n = sum(9 * a * b + 2 * b for a, b in zip(args.sizes[:-2], args.sizes[1:-1]))
            n += args.sizes[-2] * args.sizes[-1] + args.sizes[-1]
        if n > _CREATE_LIMIT:
            raise UsageError(
                f"--sizes {','.join(map(str, args.sizes))}: {n:,} values, more than create "
                f"makes ({_CREATE_LIMIT:,}); it writes small random networks"
            )
    import torch
    from torch import nn

    from converters import from_state_dict
    from metanet.io import save

    torch.manual_seed(args.seed)
    if args.family in ("mlp", "siren"):
        sizes = args.sizes or [64, 128, 128, 10]
        model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    else:
        sizes = args.sizes or [3, 16, 32, 32, 10]
        convs = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            convs += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)]
        model = nn.Sequential(*convs, nn.Linear(sizes[-2], sizes[-1]))
    sd = model.state_dict()
    space = from_state_dict(sd, args.family)
    save(out, sd, space)
    print(f"wrote {out}: {args.family} {sizes}, {space.num_params:,} values")
    return 0


# --------------------------------------------------------------------------- align & merge
def _held(args: argparse.Namespace, paths: Sequence[str]) -> dict:
    """The inputs held in memory (:func:`tasks.checkpoints.load_checkpoint`): plain state
    dicts (``--family``, ``.pt`` files) and those ``--model`` describes. Folders,
    safetensors files and hub ids are opened lazily by the engine."""
    from tasks.checkpoints import load_checkpoint

    family, spec = getattr(args, "family", None), getattr(args, "model", None)
    held = {}
    for p in paths:
        path = Path(p)
        if path.is_dir() or not path.exists():
            continue
        if family is None and spec is None and path.suffix == ".safetensors":
            continue
        model = inputs = None
        if spec:
            model, inputs = _factory_model(spec, args.input_shape, "--model")
        held[p] = load_checkpoint(p, family=family, activation=args.activation, model=model,
                                  inputs=inputs, model_name=f"--model {spec}")  # fmt: skip
    return held


def _resolve_match(args: argparse.Namespace) -> None:
    """``--match`` defaults to weight matching; ``args.match_given`` keeps whether it was
    given, so that a command that aligns nothing can refuse it rather than drop it."""
    args.match_given = args.match is not None
    args.match = args.match or "weight"


def _check_match_flags(args: argparse.Namespace, paths: Sequence[str]) -> None:
    """``--match activation/ste`` runs a model on data: both must be given up front."""
    method = getattr(args, "match", "weight")
    if method == "weight":
        return
    if args.match_data is None:
        raise UsageError(
            f"--match {method} runs the model on data: pass --match-data (digits, "
            "digits-flat, or module:function returning a list of (inputs, targets) batches)"
        )
    if args.model is None and not Path(paths[0]).is_dir():
        raise UsageError(f"--match {method} runs the model: pass --model module:factory")


def _match_data(args: argparse.Namespace, held: dict) -> list | None:
    """The batches ``--match activation|ste`` runs the model on (None for weight matching)."""
    if getattr(args, "match", "weight") == "weight":
        return None
    model = next((ck.model for ck in held.values() if ck.model is not None), None)
    return _data(args.match_data, model, split="train", flag="--match-data")


def _shard_size(args: argparse.Namespace) -> int | None:
    from metanet.shards import parse_size

    if not getattr(args, "out_shard_size", None):
        return None
    try:
        return parse_size(args.out_shard_size)
    except ValueError as e:
        raise UsageError(f"--out-shard-size: {e}") from None


def _legacy_config(method: str, args: argparse.Namespace):
    """The engine's config for metanet's own merge flags: ``align`` (the aligned
    interpolation at ``--alpha``), ``naive``, ``ties`` and ``task`` (the first checkpoint the
    base, ``--density``/``--scale``, ``--align``)."""
    from tasks.checkpoints.config import parse_config

    paths = list(args.paths)
    if method in ("align", "naive"):
        n = len(paths)
        alpha = 0.5 if args.alpha is None else args.alpha
        weights = [1 - alpha, alpha] if n == 2 else [1 / n] * n
        aligned = args.match if method == "align" else "none"
        data = {
            "merge_method": "linear",
            "models": [
                {"model": p, "parameters": {"weight": w}, "align": aligned if i else "none"}
                for i, (p, w) in enumerate(zip(paths, weights))
            ],
        }
    else:
        kit = "ties" if method == "ties" else "task_arithmetic"
        mp = {"weight": 1.0}
        if kit == "ties":
            mp["density"] = args.density if args.density is not None else 0.2
        data = {
            "merge_method": kit,
            "base_model": paths[0],
            "models": [
                {"model": p, "parameters": dict(mp), "align": args.match if args.align else "none"}
                for p in paths[1:]
            ],
            "parameters": {"lambda": 1.0 if args.scale is None else args.scale},
        }
    try:
        return parse_config(data)
    except ValueError as e:
        raise UsageError(f"--method {method}: {e}") from None


def _report_stages(args, stages) -> None:
    path = getattr(args, "stages_json", None) or os.environ.get("METANET_STAGES_JSON")
    if path:
        import json

        Path(path).write_text(json.dumps(stages.stages, indent=2) + "\n")


def _cmd_align(args: argparse.Namespace) -> int:
    import torch

    from tasks.checkpoints import align_checkpoint, stream

    _resolve_match(args)
    args.device = _device(args)
    out = Path(args.output)
    folder = Path(args.b).is_dir() and out.suffix != ".safetensors"
    _check_output(out, [args.a, args.b], args.force, folder=folder)
    _check_match_flags(args, [args.a, args.b])
    held = _held(args, [args.a, args.b])
    stages = stream.StageLog()
    align_checkpoint(
        held.get(args.a, args.a),
        held.get(args.b, args.b),
        out,
        how=args.match,
        data=_match_data(args, held),
        seed=args.seed,
        max_sweeps=args.max_sweeps,
        low_memory=args.low_memory,
        ste_epochs=args.ste_epochs,
        ste_lr=args.ste_lr,
        device=args.device,
        max_shard=_shard_size(args),
        dtype=getattr(torch, args.dtype) if getattr(args, "dtype", None) else None,
        progress=not args.quiet,
        quiet=args.quiet,
        stages=stages,
    )
    _report_stages(args, stages)
    print(f"wrote {out}: {args.b} aligned to {args.a}")
    return 0


_LEGACY_METHODS = ("align", "naive", "mergemany", "ties", "task")
# tasks.merge.methods.METHODS, named here so that --help imports no torch (a test checks)
_KIT_METHODS = (
    "linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough", "nuslerp",
    "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
)  # fmt: skip


# metanet's own merge flags, and the methods that read them (mergekit's methods read
# --param / --weights, --density where they take one, and --align)
_FLAG_METHODS = {
    "alpha": ("align", "naive"),
    "density": ("ties",),
    "scale": ("ties", "task"),
    "align": ("align", "ties", "task"),
}
# what a mergekit method takes in place of metanet's flag
_KIT_HINTS = {
    "alpha": "; slerp takes --param t=..., the others --weights",
    "scale": "; task_arithmetic and ties take --param lambda=...",
}


def _refuse_unread(args: argparse.Namespace, method: str | None, reads=()) -> None:
    """A flag the merge would not read is refused, not dropped: ``--density`` with a
    method that keeps every entry would otherwise silently merge untrimmed. ``method`` None:
    ``--config``, which sets every parameter itself."""
    given = {
        "alpha": args.alpha is not None,
        "density": args.density is not None,
        "scale": args.scale is not None,
        "align": args.align,
        "param": bool(args.param),
        "weights": bool(args.weights),
        "match": args.match_given,
        "match-data": args.match_data is not None,
    }
    for flag, on in given.items():
        if not on:
            continue
        if method is None:
            if flag == "match-data":  # the data of the YAML's align: activation|ste
                continue
            raise UsageError(
                f"--{flag}: --config sets the merge's parameters and alignment; put it in "
                "the YAML (parameters:, align:)"
            )
        if flag in reads or method in _FLAG_METHODS.get(flag, ()):
            continue
        if flag in ("match", "match-data"):
            if method == "align" or args.align:
                continue
            can = method in _FLAG_METHODS["align"] or method in _KIT_METHODS
            raise UsageError(
                f"--{flag}: --method {method} aligns nothing" + (" (add --align?)" if can else "")
            )
        if flag in ("param", "weights"):
            raise UsageError(f"--{flag} is for mergekit's methods (e.g. --method linear)")
        hint = _KIT_HINTS.get(flag, "") if method in _KIT_METHODS else ""
        raise UsageError(f"--{flag}: --method {method} does not read it{hint}")
    if args.alpha is not None and len(args.paths) != 2:
        raise UsageError(f"--alpha weighs the second of two checkpoints, got {len(args.paths)}")


def _merge_setup(args: argparse.Namespace) -> None:
    """Fill ``args.config_obj`` (a :class:`~tasks.checkpoints.config.MergeConfig`) from
    ``--config`` or from the flags of a mergekit method (``--param``, ``--weights``), and
    ``args.paths``/``method``/``aligns``; legacy methods keep their flags."""
    from tasks.checkpoints.config import parse_config
    from tasks.merge import methods as merge_methods

    args.config_obj = None
    if args.config:
        from tasks.checkpoints.config import load_config

        if args.paths:
            raise UsageError("--config names the checkpoints: give no CHECKPOINT arguments")
        if args.method:
            raise UsageError("--config names the merge method: drop --method")
        _refuse_unread(args, None)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cfg = load_config(args.config)
        except (ValueError, OSError) as e:
            raise UsageError(f"--config {args.config}: {e}") from None
        for w in caught:  # a parameter mergekit knows that the method does not use
            print(f"metanet merge: warning: {w.message}", file=sys.stderr)
    else:
        if not args.paths:
            raise UsageError("give the checkpoints to merge (or --config merge.yml)")
        method = args.method
        if method in _LEGACY_METHODS or method is None:
            default = "align" if len(args.paths) == 2 else "mergemany"
            _refuse_unread(args, method or default)
            return
        m = merge_methods.METHODS[method]
        reads = ("param", "weights", "align") + (
            ("density",) if "density" in m.model_params else ()
        )
        _refuse_unread(args, method, reads)
        n = len(args.paths) - (1 if m.needs_base else 0)
        if n < 1 or (m.n_models is not None and n != m.n_models):
            what = f"{m.n_models} checkpoint(s)" if m.n_models else "at least one checkpoint"
            raise UsageError(
                f"--method {method} merges {'a base and ' if m.needs_base else ''}{what}, "
                f"got {len(args.paths)} in all"
            )
        params = {}
        for item in args.param or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--param {item}: expected KEY=VALUE")
            params[key] = _param_value(value)
        mp = {}
        if args.density is not None and "density" in m.model_params:
            mp["density"] = args.density
        weights = [None] * n
        if args.weights:
            try:
                weights = [_finite(w) for w in args.weights.split(",")]
            except argparse.ArgumentTypeError:
                raise UsageError(
                    f"--weights {args.weights}: expected finite numbers like 0.5,0.5"
                ) from None
            if len(weights) != n:
                raise UsageError(f"--weights: {len(weights)} values for {n} models")
        model_params = [{**mp, **({"weight": w} if w is not None else {})} for w in weights]
        try:
            merge_methods.resolve_parameters(m, n, params, model_params)
        except ValueError as e:
            raise UsageError(f"--method {method}: {e}") from None
        others = args.paths[1:] if m.needs_base else args.paths
        align = args.match if args.align else "none"
        data = {
            "merge_method": method,
            "models": [
                {"model": p, "parameters": mp, "align": align if (m.needs_base or i) else "none"}
                for i, (p, mp) in enumerate(zip(others, model_params))
            ],
            "parameters": params,
        }
        if m.needs_base:
            data["base_model"] = args.paths[0]
        try:
            cfg = parse_config(data)
        except ValueError as e:
            raise UsageError(f"--method {method}: {e}") from None
    args.config_obj = cfg
    args.method = cfg.method
    needs_base = merge_methods.METHODS[cfg.method].uses_base(cfg.base is not None)
    args.paths = ([cfg.base] if cfg.base and needs_base else []) + [m.path for m in cfg.models]
    args.align_methods = (["none"] if cfg.base and needs_base else []) + [
        m.align for m in cfg.models
    ]
    if not (cfg.base and needs_base) and args.align_methods:
        args.align_methods[0] = "none"  # the first model is the reference
    if cfg.from_slices:  # every model the slices read (alignment is refused on slices)
        args.paths = cfg.paths()
        args.align_methods = ["none"] * len(args.paths)
    args.aligns = [how != "none" for how in args.align_methods]


def _engine_merge(args: argparse.Namespace, out: Path) -> int:
    """The checkpoint engine (config → plan → executor) on the config ``_merge_setup``
    built: streaming, inputs held in memory where they must be, alignment where asked."""
    from tasks.checkpoints import merge_checkpoints

    cfg = args.config_obj
    if args.dtype:
        cfg.out_dtype = args.dtype  # --dtype: the dtype written
    held = _held(args, args.paths)
    merge_checkpoints(
        cfg,
        out,
        checkpoints=held,
        data=_match_data(args, held),
        seed=args.seed,
        device=args.device,
        max_shard=_shard_size(args),
        max_sweeps=args.max_sweeps,
        low_memory=args.low_memory,
        ste_epochs=getattr(args, "ste_epochs", 1),
        ste_lr=getattr(args, "ste_lr", 1e-3),
        progress=not args.quiet,
        quiet=args.quiet,
    )
    print(f"wrote {out}: {cfg.method} merge of {len(cfg.paths())} checkpoints")
    return 0


def _param_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(text)
    except ValueError:
        return text


def _cmd_merge(args: argparse.Namespace) -> int:
    _resolve_match(args)
    args.device = _device(args)
    _merge_setup(args)
    out = Path(args.output)
    # a folder output from a folder input (a hub id resolves to one)
    first = Path(args.paths[0])
    folder = out.suffix != ".safetensors" and (first.is_dir() or not first.exists())
    inputs = list(args.paths)
    cfg = args.config_obj
    if args.config:
        inputs.append(args.config)
    if cfg is not None and cfg.tokenizer_source not in (None, "base", "union"):
        inputs.append(cfg.tokenizer_source)
    _check_output(out, inputs, args.force, folder=folder)
    if args.config_obj is None:  # metanet's own flags
        method = args.method or ("align" if len(args.paths) == 2 else "mergemany")
        if method in ("align", "naive", "mergemany") and len(args.paths) < 2:
            raise UsageError(
                f"--method {method} merges at least two checkpoints, got {len(args.paths)}"
            )
        if method == "align" and len(args.paths) != 2:
            raise UsageError(
                f"--method align merges two checkpoints, got {len(args.paths)}; use mergemany"
            )
        if method in ("ties", "task") and len(args.paths) < 2:
            raise UsageError(f"--method {method} needs a base and fine-tuned checkpoints")
        if method == "align" or (method in ("ties", "task") and args.align):
            _check_match_flags(args, args.paths)
        if method == "mergemany":
            from tasks.checkpoints import merge_many_checkpoints

            held = _held(args, args.paths)
            refs = [held.get(p, p) for p in args.paths]
            merge_many_checkpoints(refs, out, seed=args.seed, progress=not args.quiet)
            print(f"wrote {out}: mergemany merge of {len(refs)} checkpoints")
            return 0
        args.config_obj = _legacy_config(method, args)
    else:
        on_data = [how for how in args.align_methods if how in ("activation", "ste")]
        if on_data:
            args.match = on_data[0]  # what the checks name
            _check_match_flags(args, args.paths)
    return _engine_merge(args, out)


def _data(spec: str, model, split: str = "test", flag: str = "--data") -> list:
    """Batches of ``(inputs, targets)``: digits' test (or train) split, or a function's;
    the model must run on the first batch."""
    if spec in ("digits", "digits-flat"):
        from tasks.datasets import digits

        d = digits.load()
        d = d.flat() if spec == "digits-flat" else d
        if split == "train":
            data = digits.batches(d.x_train, d.y_train, 128)
        else:
            data = digits.batches(d.x_test, d.y_test)
    else:
        made = _called(spec, flag)
        try:
            data = list(made)
        except TypeError:
            data = []
        if not data or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in data):
            raise UsageError(f"{flag} {spec}: expected a non-empty list of (inputs, targets)")
        _check_batches(data, f"{flag} {spec}")
    if model is not None:  # else the model is built later (a folder's), and runs then
        out = _check_runs(model, (data[0][0],), f"the model does not run on {flag} {spec}")
        _check_targets(out, data, f"{flag} {spec}")
    return data


def _check_batches(data: list, where: str) -> None:
    """Every batch's inputs and targets are tensors, the inputs finite (a NaN input makes
    every loss NaN and matching's cost matrices unsolvable)."""
    import torch

    for i, (x, y) in enumerate(data):
        for what, t in (("inputs", x), ("targets", y)):
            if not isinstance(t, torch.Tensor):
                raise UsageError(
                    f"{where}: batch {i}'s {what} are a {type(t).__name__}, not a tensor"
                )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise UsageError(f"{where}: batch {i}'s inputs have NaN or inf values")


def _check_targets(out, data: list, where: str) -> None:
    """Class targets (integers) must index the model's outputs (``out``: its output on
    the first batch): checked on every batch before any work, not found by the loss at
    the last one."""
    import torch

    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return
    classes = out.shape[-1]
    for i, (_, y) in enumerate(data):
        if y.is_floating_point() or y.numel() == 0:
            continue
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise UsageError(
                f"{where}: batch {i}'s targets span [{lo}, {hi}], but the model has "
                f"{classes} outputs (class indices 0-{classes - 1})"
            )


def _cmd_barrier(args: argparse.Namespace) -> int:
    _resolve_match(args)
    if args.no_align and (args.match_given or args.match_data is not None):
        flag = "--match" if args.match_given else "--match-data"
        raise UsageError(f"{flag}: --no-align matches nothing; drop one of them")
    if args.data is None:
        raise UsageError(
            "barrier evaluates the model: pass --data (digits, digits-flat, or "
            "module:function returning a list of (inputs, targets) batches)"
        )
    if args.model is None and not Path(args.a).is_dir():
        raise UsageError(f"{args.a}: no model to evaluate; pass --model module:factory")
    if args.alphas < 2:
        raise UsageError(f"--alphas {args.alphas}: need at least 2 points (the endpoints)")
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = sorted(FigureCanvasBase.get_supported_filetypes(), key=lambda k: k != "png")
        formats = tuple(f".{k}" for k in kinds)  # .png first: named when a folder is given
        _check_output(Path(args.plot), [args.a, args.b], args.force, folder=False,
                      suffixes=formats, flag="--plot")  # fmt: skip
    _check_match_flags(args, [args.a, args.b])
    from tasks.checkpoints import barrier_curves, load_checkpoint
    from tasks.merge import evaluator, plot_barriers

    held = _held(args, [args.a, args.b])
    a, b = (held.get(p) or load_checkpoint(p) for p in (args.a, args.b))
    evaluate = evaluator(a.model, _data(args.data, a.model), accuracy=True)
    curves = barrier_curves(
        a,
        b,
        evaluate,
        alphas=args.alphas,
        align=None if args.no_align else args.match,
        data=_match_data(args, {"a": a}),
        seed=args.seed,
        max_sweeps=args.max_sweeps,
        ste_epochs=args.ste_epochs,
        ste_lr=args.ste_lr,
        progress=not args.quiet,
        quiet=args.quiet,
    )
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
def _row_fields(folder: Path) -> set[str]:
    """The fields of a weight dataset's index rows (``label``, ``psnr``, ``accuracy``, ...),
    read from the first shard's metadata without loading any tensor."""
    import json

    from safetensors import safe_open

    from metanet.io import CheckpointError
    from tasks.datasets.inr import INDEX_KEY

    if not (folder / "dataset.json").is_file():
        raise CheckpointError(f"{folder}: no dataset.json; not a weight dataset folder")
    shards = sorted(folder.glob("shard-*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no shards yet; make the dataset first")
    try:
        with safe_open(str(shards[0]), framework="pt") as f:
            rows = json.loads((f.metadata() or {})[INDEX_KEY])
    except Exception as e:  # noqa: BLE001 - name the file at fault
        raise CheckpointError(f"{shards[0]}: unreadable shard index ({e})") from None
    return set(rows[0]) if rows else set()


def _num_shards(args: argparse.Namespace, default: int) -> int:
    """``--shard I/N`` names the shard count too: a different ``--num-shards`` beside it is
    refused, not dropped."""
    if args.shard and args.num_shards is not None and args.num_shards != args.shard[1]:
        raise UsageError(
            f"--num-shards {args.num_shards}: --shard {args.shard[0]}/{args.shard[1]} makes a "
            f"shard of {args.shard[1]}; give one count"
        )
    return args.shard[1] if args.shard else (args.num_shards or default)


# inr make's flags without a default: given to inr info, they are refused, not dropped
_INR_MAKE_FLAGS = ("train_views", "shard", "num_shards", "images", "resolution", "dwsnets",
                   "width", "depth", "steps", "lr", "w0", "variant", "target_psnr")  # fmt: skip


def _cmd_inr(args: argparse.Namespace) -> int:
    if args.action == "info":
        given = next((f for f in _INR_MAKE_FLAGS if getattr(args, f) is not None), None)
        if given:
            raise UsageError(f"--{given.replace('_', '-')}: inr info reads a dataset; it "
                             "makes nothing")  # fmt: skip
        fields = _row_fields(Path(args.out))
        if "psnr" not in fields:
            from metanet.io import CheckpointError

            raise CheckpointError(
                f"{args.out}: not an INR dataset (its networks have no 'psnr'"
                + ("; they have a test 'accuracy': a zoo" if "accuracy" in fields else "")
                + "); metanet inr info reads INR datasets"
            )
        from tasks.datasets import inr

        ds = inr.WeightDataset(args.out)
        splits = {s: sum(r["split"] == s for r in ds.rows) for s in ("train", "val", "test")}
        psnr = ds.psnr[ds.psnr.isfinite()]
        quality = (
            f"PSNR mean {psnr.mean():.2f} dB (min {psnr.min():.2f}, median {psnr.median():.2f})"
            if len(psnr)
            else "PSNR not recorded"
        )
        views = ds.meta.get("train_per_image")
        per = f"; {views} per training image, {ds.meta['per_image']} per other" if views else ""
        print(
            f"{args.out}: {len(ds):,} INRs ({', '.join(f'{k} {v:,}' for k, v in splits.items())}"
            f"{per}), " + quality
        )
        return 0
    import dataclasses

    from tasks.datasets import inr

    device = _device(args)

    given = {
        "hidden": args.width, "depth": args.depth, "steps": args.steps, "lr": args.lr,
        "w0": args.w0, "variant": args.variant, "target_psnr": args.target_psnr,
    }  # fmt: skip
    cfg = inr.INRConfig(**{k: v for k, v in given.items() if v is not None})
    if args.resolution is not None and args.resolution > _MAX_RESOLUTION:
        raise UsageError(
            f"--resolution {args.resolution}: over {_MAX_RESOLUTION} (one SIREN per image is "
            "fitted to every pixel)"
        )
    if cfg.target_psnr is not None and cfg.target_psnr < 0:
        raise UsageError(f"--target-psnr {cfg.target_psnr:g}: a PSNR in dB, >= 0 (0: never stop)")
    if cfg.target_psnr == 0:
        cfg = dataclasses.replace(cfg, target_psnr=None)
    for flag, place in (("DIR", args.out), ("--dwsnets", args.dwsnets)):
        if place is not None and Path(place).exists() and not Path(place).is_dir():
            raise UsageError(f"{flag} {place}: is a file; inr make writes a folder there")
    if args.dwsnets is not None and Path(args.dwsnets).resolve() == Path(args.out).resolve():
        raise UsageError(f"--dwsnets {args.dwsnets}: is the dataset's folder; give it its own")
    if args.train_views is not None and args.train_views < args.per_image:
        raise UsageError(
            f"--train-views {args.train_views}: fewer than --per-image {args.per_image}; "
            "training images get at least as many INRs as the others"
        )
    inputs = [args.images] if args.images else []
    for place in filter(None, (args.out, args.dwsnets)):
        for src in inputs:
            if Path(src).is_dir() and Path(src).resolve() in [
                Path(place).resolve(),
                *Path(place).resolve().parents,
            ]:
                raise UsageError(f"{place}: is inside the input {src}; write it elsewhere")
    paths = inr.make_dataset(
        args.out,
        per_image=args.per_image,
        train_per_image=args.train_views,
        cfg=cfg,
        images=args.images,
        dwsnets=args.dwsnets,
        resolution=args.resolution,
        shard=args.shard,
        num_shards=_num_shards(args, 10),
        seed=args.seed,
        progress=not args.quiet,
        device=device,
    )
    print(f"{args.out}: {len(paths)} shard(s) present")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    device = _device(args)
    from tasks.datasets import zoo

    paths = zoo.make_zoo(
        args.out,
        args.n,
        seed=args.seed,
        shard=args.shard,
        num_shards=_num_shards(args, 4),
        max_steps=args.max_steps,
        progress=not args.quiet,
        device=device,
    )
    print(f"{args.out}: {len(paths)} shard(s) present")
    return 0


# published weight datasets metanet imports (tasks.datasets.field.IMPORTERS; a test
# keeps the two lists equal), and the importer options the CLI passes on
DATASET_KINDS = ("dwsnets-mnist", "dwsnets-fmnist", "nfn-siren", "small-cnn-zoo")
IMPORT_OPTIONS = ("splits", "order", "augmentations", "step", "prefix", "val_size")


def _cmd_datasets(args: argparse.Namespace) -> int:
    import inspect

    from tasks.datasets.field import IMPORTERS, import_dataset

    if not Path(args.src).exists():
        raise UsageError(f"{args.src}: no such file or folder (the unpacked release)")
    options = {k: getattr(args, k) for k in IMPORT_OPTIONS if getattr(args, k) is not None}
    accepted = inspect.signature(IMPORTERS[args.kind]).parameters
    for key in options:
        if key not in accepted:
            raise UsageError(f"--{key.replace('_', '-')} does not apply to {args.kind} datasets")
    if "splits" in options and "val_size" in options:  # the splits file holds the validation set
        raise UsageError("--val-size: --splits names the validation INRs; give one of them")
    paths = import_dataset(args.kind, args.src, args.dst, progress=not args.quiet, **options)
    print(f"{args.dst}: {len(paths)} shard(s) present")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    target = args.target
    if target is None:  # obvious for INRs (the digit); a zoo's networks carry two targets
        if "accuracy" in _row_fields(Path(args.dataset)):
            raise UsageError(
                f"{args.dataset}: a zoo of trained networks; say what to learn: --target "
                "accuracy (regress each network's test accuracy) or --target label "
                "(classify its label, a CNN zoo's accuracy decile)"
            )
        target = "label"
    from tasks.learn.train import ENCODING_KINDS

    if args.frequencies and args.kind not in ENCODING_KINDS:
        raise UsageError(
            f"--frequencies: {args.kind} does not read it (only {', '.join(ENCODING_KINDS)} "
            "encode the weights)"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; training writes a folder")
    dataset = Path(args.dataset).resolve()
    if out.resolve() == dataset or dataset in out.resolve().parents:
        raise UsageError(
            f"--out {out}: is inside the dataset {args.dataset}; write the model somewhere else"
        )
    device = _device(args)
    from tasks.learn.train import train

    coords = None
    if args.augment_coords is not None:
        from tasks.datasets.inr import CoordAugment

        try:
            coords = CoordAugment.parse(args.augment_coords)
        except ValueError as e:
            raise UsageError(f"--augment-coords: {e}") from None
    r = train(
        args.kind,
        args.dataset,
        out=out,
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
        target=target,
        canonicalize=args.canonicalize,
        flip_signs=args.flip_signs,
        probes=args.probes,
        patience=args.patience,
        coords=coords,
        device=device,
    )
    if r.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        if target == "accuracy":
            score = f"test Kendall tau {r.test_kendall_tau:.4f}, val {r.val_kendall_tau:.4f}"
        else:
            score = f"test accuracy {r.test_accuracy:.4f}, val {r.val_accuracy:.4f}"
        print(
            f"{args.kind}: {score}, {r.seconds:.1f} s on {r.world_size} process(es); "
            f"outputs in {out}"
        )
    return 0


# --------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, silent where there is no default to show (an off
    switch, or a value that is read elsewhere when not given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``metanet CMD: error: ...``), exit 2, like
    every other refusal; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metanet", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"metanet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars or progress lines (also silences transformers' bars)",
    )

    def command(name: str, help: str, run: Callable[[argparse.Namespace], int]):
        p = sub.add_parser(
            name, help=help, description=help, parents=[quiet], formatter_class=_HelpFormatter
        )
        p.set_defaults(run=run)
        return p

    def model_flags(p: argparse.ArgumentParser, input_shape_help: str) -> None:
        p.add_argument(
            "--family",
            choices=FAMILIES,
            help="describe a plain state dict (.safetensors/.pt without a WeightSpace)",
        )
        p.add_argument(
            "--activation",
            type=_activation,
            help="hidden activation of --family (default: relu; sin for siren)",
        )
        p.add_argument("--input-shape", type=_int_list, metavar="N,...", help=input_shape_help)

    def output_flags(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("-o", "--output", required=True, metavar="PATH", help=what)
        p.add_argument("--force", action="store_true", help="overwrite an existing output")

    for name, help, run in (
        ("inspect", "print the WeightSpace summary of a checkpoint", _cmd_inspect),
        ("graph", "build the parameter graph and print its size and build time", _cmd_graph),
    ):
        p = command(name, help, run)
        p.add_argument(
            "path",
            help="a metanet .safetensors checkpoint, a plain .safetensors/.pt state dict "
            "(with --family), a Hugging Face model folder, or module:factory (a function "
            "returning a model or (model, example_inputs); the current folder is importable)",
        )
        model_flags(p, "example input shape for a module:factory (randn inputs)")
        if name == "inspect":
            p.add_argument("--json", action="store_true", help="print the WeightSpace as JSON")
            p.add_argument("--tensors", action="store_true", help="list every tensor and its axes")

    p = command("create", "write a random network of a family with its WeightSpace", _cmd_create)
    p.add_argument("family", choices=FAMILIES, help="the state-dict family")
    output_flags(p, "the .safetensors file to write")
    p.add_argument(
        "--sizes",
        type=_int_list,
        metavar="N,...",
        help="layer widths: mlp/siren in,hidden...,out (default 64,128,128,10); "
        "cnn in,conv...,classes (default 3,16,32,32,10)",
    )
    p.add_argument("--seed", type=_nonneg, default=0, help="torch seed of the initialisation")

    def pair(p: argparse.ArgumentParser, many: bool = False) -> None:
        if many:
            p.add_argument(
                "paths",
                nargs="*",
                metavar="CHECKPOINT",
                help="metanet checkpoints or Hugging Face folders (first = reference / base)",
            )
        else:
            p.add_argument("a", help="reference checkpoint (metanet .safetensors or HF folder)")
            p.add_argument("b", help="checkpoint to align to a")
        p.add_argument("--family", choices=FAMILIES, help="describe plain state dicts")
        p.add_argument("--activation", type=_activation, help="hidden activation of --family")
        p.add_argument(
            "--model",
            metavar="MODULE:FACTORY",
            help="function building the checkpoints' architecture, checked against them "
            "(verifies the aligned function; needed by barrier and --match activation/ste "
            "for non-HF inputs)",
        )
        p.add_argument(
            "--input-shape",
            type=_int_list,
            metavar="N,...",
            help="example input shape for --model (randn inputs), e.g. 8,64",
        )
        p.add_argument("--seed", type=_nonneg, default=0, help="random group order of the matching")
        p.add_argument(
            "--max-sweeps",
            type=_positive,
            default=100,
            help="weight matching: most coordinate sweeps",
        )
        p.add_argument(
            "--match",
            choices=["weight", "activation", "ste"],
            help="how B is permuted (default: weight): weight matching (data-free, fast, best "
            "on MLPs/CNNs), activation matching, or the straight-through estimator started from "
            "activation matching (runs --model on --match-data; far lower barriers on "
            "transformers)",
        )
        p.add_argument(
            "--match-data",
            metavar="DATA",
            help="--match activation/ste: digits, digits-flat (training split) or "
            "module:function returning a list of (inputs, targets) batches",
        )
        p.add_argument("--ste-epochs", type=_positive, default=10, help="--match ste: epochs")
        p.add_argument("--ste-lr", type=_positive_float, default=1e-2, help="--match ste: Adam lr")

    def device_flag(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--device",
            default="cpu",
            metavar="{auto,cpu,cuda}",
            help=f"where {what} runs (auto: cuda when there is one)",
        )

    def stream_flags(p: argparse.ArgumentParser) -> None:
        device_flag(p, "weight matching's cost matrices and the merge's tensors")
        p.add_argument(
            "--low-memory",
            action="store_true",
            help="match by reading tensors from disk at every step (slower; the default "
            "holds the pair's matched tensors in memory when they fit in available RAM)",
        )
        p.add_argument(
            "--out-shard-size",
            metavar="SIZE",
            help="Hugging Face output: reshard the weights into files of at most SIZE "
            "(e.g. 2GB, 500MB); default: the input's shard layout",
        )
        p.add_argument(
            "--dtype",
            choices=["float32", "float16", "bfloat16"],
            help="output dtype of floating tensors (default: the input's)",
        )

    p = command("align", "permute B to match A (Git Re-Basin), checked, then saved", _cmd_align)
    pair(p)
    output_flags(p, "where to write B aligned (a .safetensors file, or a folder for HF inputs)")
    stream_flags(p)

    p = command(
        "merge",
        "merge checkpoints (aligned interpolation, MergeMany, mergekit's methods)",
        _cmd_merge,
    )
    pair(p, many=True)
    output_flags(p, "where to write the merge (a .safetensors file, or a folder for HF inputs)")
    p.add_argument(
        "--method",
        choices=[*_LEGACY_METHODS] + [m for m in _KIT_METHODS if m not in _LEGACY_METHODS],
        help="align: interpolate after weight matching (default for two checkpoints); "
        "naive: plain average; mergemany: MergeMany (default for more); ties / task: TIES "
        "or task arithmetic on the first checkpoint as base (--density, --scale); the others "
        "are mergekit's (the first checkpoint is the base where the method takes one; "
        "--param KEY=VALUE, --weights, --density, --align)",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="a merge config in mergekit's format (merge_method, base_model, models with "
        "parameters and our align: none|weight); replaces CHECKPOINT and --method",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="a global parameter of a mergekit method (t=0.3, lambda=1, normalize=false)",
    )
    p.add_argument(
        "--weights", metavar="W,...", help="mergekit methods: per-model weights (non-base)"
    )
    p.add_argument(
        "--alpha", type=_finite, help="align / naive: weight of the second checkpoint (0.5)"
    )
    p.add_argument(
        "--density",
        type=_fraction,
        help="ties / dare / breadcrumbs: fraction of each task vector kept (ties default 0.2)",
    )
    p.add_argument("--scale", type=_finite, help="ties / task: task-vector scale (1)")
    p.add_argument("--align", action="store_true", help="ties / task: align to the base first")
    stream_flags(p)

    p = command("barrier", "loss along the line from A to B, naive and aligned", _cmd_barrier)
    pair(p)
    p.add_argument(
        "--data",
        help="test data: digits, digits-flat, or module:function returning (inputs, targets) "
        "batches",
    )
    p.add_argument(
        "--alphas",
        type=_positive,
        default=11,
        help="interpolation points from A to B, ends included",
    )
    p.add_argument("--no-align", action="store_true", help="only the naive interpolation")
    p.add_argument("--plot", metavar="PNG", help="save the curves to this image (.png, .pdf, .svg)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot")

    p = command(
        "inr",
        "INR weight datasets: fit SIRENs to images (sklearn's digits, or yours), or info",
        _cmd_inr,
    )
    p.add_argument("action", choices=["make", "info"], help="make a dataset, or summarise one")
    p.add_argument("out", metavar="DIR", help="dataset folder")
    p.add_argument("--per-image", type=_positive, default=10, help="INRs per image (seeds)")
    p.add_argument(
        "--train-views",
        type=_positive,
        metavar="K",
        help="K INRs per training image (other seeds, the same image: augmentation); "
        "validation and test images keep --per-image",
    )
    p.add_argument(
        "--shard", type=_shard, metavar="I/N", help="make only shard I of N (shards run anywhere)"
    )
    p.add_argument("--num-shards", type=_positive, help="shards of the whole dataset (default 10)")
    p.add_argument(
        "--images",
        metavar="PATH",
        help="fit these images instead of sklearn's digits: a folder of class subfolders of "
        "image files, or an .npz with images (N,H,W[,C]) and labels (or an .npy of images)",
    )
    p.add_argument(
        "--resolution",
        type=_positive,
        help="resize the images to this side (digits: 8 native, default; 28 upsampled)",
    )
    p.add_argument(
        "--dwsnets",
        metavar="DIR",
        help="also write the INRs in DWSNets' published layout (one .pth per INR + "
        "mnist_splits.json; 28x28 grayscale, labels 0-9)",
    )
    # defaults: tasks.datasets.inr.INRConfig (the DWSNets recipe), read there (tests check the text)
    p.add_argument("--width", type=_positive, help="hidden width (default 32)")
    p.add_argument("--depth", type=_positive, help="hidden layers (default 2)")
    p.add_argument("--steps", type=_positive, help="most fitting steps (default 1000)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 0.0005)")
    p.add_argument("--w0", type=_positive_float, help="sine frequency factor (default 30.0)")
    p.add_argument("--variant", choices=["siren", "dws"], help="initialisation (default dws)")
    p.add_argument(
        "--target-psnr", type=_finite, help="stop each INR at this PSNR; 0: never (default 40.0)"
    )
    p.add_argument("--seed", type=_nonneg, default=0, help="base seed of the INRs")
    device_flag(p, "the SIRENs are fitted")

    p = command("zoo", "CNN zoo: train small CNNs on sklearn's digits", _cmd_zoo)
    p.add_argument("action", choices=["make"], help="make the zoo (resumes an interrupted one)")
    p.add_argument("out", metavar="DIR", help="dataset folder")
    p.add_argument("--n", type=_positive, default=1000, help="number of CNNs")
    p.add_argument(
        "--shard", type=_shard, metavar="I/N", help="make only shard I of N (shards run anywhere)"
    )
    p.add_argument("--num-shards", type=_positive, help="shards of the whole zoo (default 4)")
    p.add_argument("--max-steps", type=_positive, help="cap every CNN's training steps")
    p.add_argument("--seed", type=_nonneg, default=0, help="base seed of the recipes")
    device_flag(p, "the CNNs train")

    p = command(
        "datasets", "import a published weight dataset into a metanet dataset", _cmd_datasets
    )
    p.add_argument("action", choices=["import"], help="import (resumes an interrupted one)")
    p.add_argument("kind", choices=DATASET_KINDS, help="the release's layout")
    p.add_argument("src", help="the unpacked release (nothing downloads)")
    p.add_argument("dst", metavar="DIR", help="dataset folder to write")
    p.add_argument("--splits", help="dwsnets-*: the release's splits json")
    p.add_argument("--order", help="small-cnn-zoo: NFN's *_split.csv order")
    p.add_argument("--augmentations", type=_nonneg, help="nfn-siren: add NFN's _aug0..K-1 sets")
    p.add_argument("--step", type=_nonneg, help="small-cnn-zoo: the training step to read")
    p.add_argument("--prefix", help="nfn-siren: file prefix (default randinit_smaller)")
    p.add_argument(
        "--val-size",
        type=_positive,
        help="dwsnets-mnist without --splits: training INRs held out for validation "
        "(default 5000, as DWSNets' script)",
    )

    p = command(
        "train",
        "train a metanetwork on a weight dataset (under torchrun: data-parallel)",
        _cmd_train,
    )
    p.add_argument(
        "kind",
        choices=list(TRAIN_KINDS),
        metavar="KIND",
        help="; ".join(f"{k}: {v}" for k, v in TRAIN_KINDS.items()),
    )
    p.add_argument(
        "dataset",
        metavar="DIR",
        help="folder made by metanet inr make, zoo make or datasets import",
    )
    p.add_argument("--out", default="train_out", metavar="DIR", help="metrics, curves, model")
    p.add_argument("--epochs", type=_positive, default=10, help="passes over the training split")
    p.add_argument(
        "--batch-size", type=_positive, default=64, help="networks per step (over all processes)"
    )
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--hidden", type=_positive, default=16, help="channels / hidden width of the model"
    )
    p.add_argument("--seed", type=_nonneg, default=0, help="initialisation and batch order")
    p.add_argument("--limit", type=_positive, help="at most this many training networks")
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="no random group elements per draw (only the flat model and --flip-signs use them)",
    )
    p.add_argument(
        "--frequencies", type=_nonneg, default=0, help="Fourier-encode the weights (0: raw values)"
    )
    p.add_argument(
        "--schedule", choices=["constant", "cosine"], default="constant", help="learning rate"
    )
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
        "--probes",
        type=_nonneg,
        default=0,
        metavar="P",
        help="add probe features: every neuron's activation at P fixed inputs (INR datasets)",
    )
    p.add_argument(
        "--augment-coords",
        nargs="?",
        const="",
        default=None,
        metavar="K=V,...",
        help="INR datasets: a random affine map of each training INR's input coordinates "
        "per draw, applied to its first layer (the image rotated, scaled, sheared, shifted); "
        "optionally CoordAugment fields, e.g. rotate=20,contrast=0.2,brightness=0.1 (the "
        "last two also change the values drawn, in the output layer)",
    )
    device_flag(p, "training")
    p.add_argument(
        "--patience",
        type=_positive,
        default=None,
        metavar="K",
        help="early stopping: stop after K epochs without a better validation score and "
        "report the best validation epoch (default: train all --epochs)",
    )
    p.add_argument(
        "--target",
        choices=["label", "accuracy"],
        help="label: classify (INR datasets: the digit; the default there); accuracy: "
        "regress each network's stored test accuracy (a CNN zoo), scored by Kendall tau",
    )
    return parser


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """Under ``-q``, silence transformers' (and huggingface_hub's) bars and notices too.

    Not yet imported, they read their environment switches (and keep the setting for the
    process); already imported, they are switched through their logging API and back
    afterwards, since ``main`` also runs in-process."""
    if not quiet:
        yield
        return
    switches = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    saved = {k: os.environ.get(k) for k in switches}
    hf_logging = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    os.environ.update(switches)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hf_logging is not None:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input prints ``metanet CMD: error: ...`` (one line), exit 2."""
    args = build_parser().parse_args(argv)
    import signal

    def _terminated(signum, _frame):
        # SIGTERM (timeout, schedulers) unwinds like Ctrl-C: temporary outputs are removed.
        # Signals that follow are ignored, so a second one (a scheduler's repeat, an
        # impatient Ctrl-C) cannot cut that cleanup short with a traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    if threading_main():
        signal.signal(signal.SIGTERM, _terminated)
        signal.signal(signal.SIGINT, _terminated)
    try:
        with _quiet_libraries(args.quiet):
            return args.run(args)
    except KeyboardInterrupt:
        # align/merge write through temporary names: their previous output is intact
        print(f"metanet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        output = getattr(args, "output", None) or getattr(args, "plot", None)
        name = getattr(e, "filename", None)
        staged = isinstance(e, OSError) and output and isinstance(name, str)
        if staged and Path(name).name.startswith(".") and Path(output).name in Path(name).name:
            # the temporary name an output is staged under means nothing to the user
            message = f"{output}: cannot be written ({e.strerror or type(e).__name__})"
        print(f"metanet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
