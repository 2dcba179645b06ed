"""Moved to :mod:`tasks.optim.learned_opt`; this path and its submodules stay aliases of it."""

import importlib
import sys

_moved = importlib.import_module("tasks.optim.learned_opt")
sys.modules[__name__] = _moved
for _sub in ("families", "meta", "rule"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"tasks.optim.learned_opt.{_sub}")
