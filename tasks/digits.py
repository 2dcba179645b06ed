"""Moved to :mod:`tasks.datasets.digits`; this path stays an alias of it (the same module)."""

import sys

import tasks.datasets.digits as _moved

sys.modules[__name__] = _moved
