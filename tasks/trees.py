"""Moved to :mod:`tasks.align.trees`; this path stays an alias of it (the same module)."""

import sys

import tasks.align.trees as _moved

sys.modules[__name__] = _moved
