"""Moved to :mod:`tasks.datasets.mixed_zoo`; this path stays an alias of it (the same module)."""

import sys

import tasks.datasets.mixed_zoo as _moved

sys.modules[__name__] = _moved
