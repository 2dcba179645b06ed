"""Moved to :mod:`tasks.optim.teleport`; this path stays an alias of it (the same module)."""

import sys

import tasks.optim.teleport as _moved

sys.modules[__name__] = _moved
