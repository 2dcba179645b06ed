"""Moved to :mod:`tasks.learn.train`; this path stays an alias of it (the same module)."""

import sys

import tasks.learn.train as _moved

sys.modules[__name__] = _moved
