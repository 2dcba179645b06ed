"""Moved to :mod:`tasks.optim.scale_invariant`; this path stays an alias of it (the same module)."""

import sys

import tasks.optim.scale_invariant as _moved

sys.modules[__name__] = _moved
