"""Helpers the test modules share (plain functions; the skip rule and fixtures live in
``conftest.py``)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest
import torch

from converters import ConverterWarning, from_module
from metanet import Axis, Group, NeuronSet, TensorSpec, WeightSpace
from metanet.cli import main


def attention_space(d: int = 12, heads: int = 3, fused: bool = False) -> WeightSpace:
    """Self-attention with a residual stream ``r``: heads permute as heads and, per head,
    within q/k dims (shared by q and k) and within v dims (shared by v and the output)."""
    hd = d // heads
    groups = [
        Group("r", d),
        Group("heads", heads),
        Group("qk", hd, within="heads"),
        Group("v", hd, within="heads"),
    ]
    stream = Axis.of("r", d)
    qk = Axis.product(("heads", heads), ("qk", hd))
    v = Axis.product(("heads", heads), ("v", hd))
    sets = [
        NeuronSet("tokens", Axis.fixed(5), "input", 0),
        NeuronSet("stream", stream, "residual", 1),
        NeuronSet("q", qk, "hidden", 2),
        NeuronSet("k", qk, "hidden", 2),
        NeuronSet("v", v, "hidden", 2),
        NeuronSet("stream_out", stream, "residual", 3),
        NeuronSet("logits", Axis.fixed(4), "output", 4),
    ]

    def edge(name, shape, out_set, in_set):
        axes = (
            next(s.axis for s in sets if s.name == out_set),
            next(s.axis for s in sets if s.name == in_set),
        )
        return TensorSpec(name, shape, axes, out_set=out_set, out_axis=0, in_set=in_set, in_axis=1)

    def bias(name, on):
        axis = next(s.axis for s in sets if s.name == on)
        return TensorSpec(name, (axis.size,), (axis,), role="bias", out_set=on, out_axis=0)

    # the embedding table is (tokens, d): its neuron axis is the second one
    tensors = [
        TensorSpec(
            "embed",
            (5, d),
            (Axis.fixed(5), stream),
            out_set="stream",
            out_axis=1,
            in_set="tokens",
            in_axis=0,
        )
    ]
    if fused:
        qkv = Axis.concat(qk, qk, v)
        tensors += [
            TensorSpec("qkv.weight", (3 * d, d), (qkv, stream)),
            TensorSpec("qkv.bias", (3 * d,), (qkv,), role="bias"),
        ]
    else:
        for name in ("q", "k", "v"):
            tensors += [edge(f"{name}.weight", (d, d), name, "stream"), bias(f"{name}.bias", name)]
    tensors += [
        edge("o.weight", (d, d), "stream_out", "v"),
        bias("o.bias", "stream_out"),
        edge("unembed", (4, d), "logits", "stream_out"),
    ]
    return WeightSpace.build(groups, tensors, sets, identities=[("stream", "stream_out")])


_SPACES: dict[str, tuple] = {}


def converted(entry):
    """A zoo entry built in float64, converted once (cached): ``(model, inputs, space)``."""
    if not entry.available():
        pytest.skip(f"{entry.name} needs {entry.requires}")
    if entry.name not in _SPACES:
        model = entry.build(torch.float64)
        inputs = entry.inputs(torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConverterWarning)
            space = from_module(model, inputs)
        _SPACES[entry.name] = (model, inputs, space)
    return _SPACES[entry.name]


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links by their target path, folders named)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "folder"
    return out


def refused(argv, capsys, root: Path, *needles) -> str:
    """``main(argv)``: exit 2 and one stderr line holding every needle; nothing under
    ``root`` written or changed (flags argparse checks end in SystemExit(2), same line)."""
    before = digest(root)
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"metanet {argv[0]}: error: "), line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    assert digest(root) == before
    return line
