"""Resident-set readings for the benchmarks (Linux /proc)."""

from __future__ import annotations


def rss_bytes(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
