"""Moved to :mod:`tasks.datasets.zoo`; this path stays an alias of it (the same module)."""

import sys

import tasks.datasets.zoo as _moved

sys.modules[__name__] = _moved
