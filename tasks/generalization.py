"""Moved to :mod:`tasks.learn.generalization`; this path stays an alias of it (the same module)."""

import sys

import tasks.learn.generalization as _moved

sys.modules[__name__] = _moved
