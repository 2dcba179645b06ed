"""tasks/ is grouped by job; the flat module names of the release before stay aliases."""

from __future__ import annotations

import importlib

import pytest

import tasks

MOVED = {
    "tasks.inr": "tasks.datasets.inr",
    "tasks.zoo": "tasks.datasets.zoo",
    "tasks.mixed_zoo": "tasks.datasets.mixed_zoo",
    "tasks.field_datasets": "tasks.datasets.field",
    "tasks.digits": "tasks.datasets.digits",
    "tasks.train": "tasks.learn.train",
    "tasks.generalization": "tasks.learn.generalization",
    "tasks.inr_edit": "tasks.learn.inr_edit",
    "tasks.teleport": "tasks.optim.teleport",
    "tasks.scale_invariant": "tasks.optim.scale_invariant",
    "tasks.learned_opt": "tasks.optim.learned_opt",
    "tasks.learned_opt.meta": "tasks.optim.learned_opt.meta",
    "tasks.merge_methods": "tasks.merge.methods",
    "tasks.stream": "tasks.checkpoints.stream",
    "tasks.trees": "tasks.align.trees",
}


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_names_are_the_same_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_every_package_names_what_it_holds():
    for pkg in ("checkpoints", "align", "merge", "datasets", "learn", "optim"):
        assert f":mod:`tasks.{pkg}`" in tasks.__doc__, pkg
        module = importlib.import_module(f"tasks.{pkg}")
        assert module.__doc__, pkg
