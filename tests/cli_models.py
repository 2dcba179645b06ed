"""Factories the CLI tests pass as ``--model tests.cli_models:NAME``."""

import torch

from tasks.datasets import digits


def digits_mlp():
    """The architecture of the checkpoints in tests/cli/test_cli_align.py, with an example input."""
    return digits.mlp(64, 2), (torch.randn(4, 64),)


def digits_mlp_alone():
    """The same architecture without example inputs (tracing it needs --input-shape)."""
    return digits.mlp(64, 2)
