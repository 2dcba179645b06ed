"""The symmetry found by ``converters.from_module`` on every reference-zoo model.

For each model: parameters, permutation groups found (and how many are indexed per head),
free permutation dimensions found vs the hand count written in the test fixtures, the
worst output change over 5 random group elements (float64, relative to the output
scale), and the conversion time. Prints a Markdown table (the one in README).

    python benchmarks/zoo_symmetry.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fixtures

from converters import from_module  # noqa: E402
from metanet.testing import assert_function_preserved  # noqa: E402
from tests.fixtures.architectures import ZOO  # noqa: E402


def main() -> None:
    rows = []
    for entry in ZOO:
        if not entry.available():
            rows.append(f"| {entry.name} | – | – | – | – | – | – | needs `{entry.requires}` |")
            continue
        model, x = entry.build(torch.float64), entry.inputs(torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            space = from_module(model, x)
            seconds = time.perf_counter() - t0
        err = assert_function_preserved(model, space, x, n=5, rtol=1.0, dtype=None)
        indexed = sum(g.within is not None for g in space.groups.values())
        found, hand = space.free_dims(), entry.hand_count
        why = (
            "matches the hand count" if found == hand else "**differs**: " + "; ".join(space.notes)
        )
        rows.append(
            f"| {entry.name} | {space.num_params:,} | {len(space.groups)} ({indexed} per-head) | "
            f"{found} | {hand} | {err:.1e} | {seconds:.2f} | {why} |"
        )
    print(
        "| model | params | groups | free dims found | hand count | max rel. error (5 elements) | convert (s) | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
