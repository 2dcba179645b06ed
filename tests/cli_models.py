"""Factories the CLI tests pass as ``--model tests.cli_models:NAME``."""

import torch

from tasks.datasets import digits


def digits_mlp():
    """The architecture of the checkpoints in tests/cli/test_cli_align.py, with an example input."""
    return digits.mlp(64, 2), (torch.randn(4, 64),)


def digits_mlp_alone():
    """The same architecture without example inputs (tracing it needs --input-shape)."""
    return digits.mlp(64, 2)


def raises():
    """A factory or data function with a bug of its own."""
    raise RuntimeError("the user's own bug")


def _flat_digits():
    d = digits.load().flat()
    return d.x_test[:64], d.y_test[:64]


def nan_data():
    """Digit batches, one input NaN."""
    x, y = _flat_digits()
    x = x.clone()
    x[3, 5] = float("nan")
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def bad_targets():
    """Digit batches whose second batch has a class index past the model's 10 outputs."""
    x, y = _flat_digits()
    y = y.clone()
    y[40] = 50
    return [(x[:32], y[:32]), (x[32:], y[32:])]
