"""Moved to :mod:`tasks.datasets.field`; this path stays an alias of it (the same module)."""

import sys

import tasks.datasets.field as _moved

sys.modules[__name__] = _moved
