"""Moved to :mod:`tasks.learn.inr_edit`; this path stays an alias of it (the same module)."""

import sys

import tasks.learn.inr_edit as _moved

sys.modules[__name__] = _moved
