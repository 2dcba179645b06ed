"""Moved to :mod:`tasks.merge.methods`; this path stays an alias of it (the same module)."""

import sys

import tasks.merge.methods as _moved

sys.modules[__name__] = _moved
