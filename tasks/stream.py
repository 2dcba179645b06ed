"""Moved to :mod:`tasks.checkpoints.stream`; this path stays an alias of it (the same module)."""

import sys

import tasks.checkpoints.stream as _moved

sys.modules[__name__] = _moved
