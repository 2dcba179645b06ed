"""Moved to :mod:`tasks.datasets.inr`; this path stays an alias of it (the same module)."""

import sys

import tasks.datasets.inr as _moved

sys.modules[__name__] = _moved
