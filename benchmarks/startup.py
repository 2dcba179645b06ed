"""Start-up time of the ``metanet`` command and import time of the three packages.

Every number is the median over ``--repeats`` fresh processes, measured from this
process (wall clock, so a loaded machine inflates them all alike). The baseline in the
same run is the bare interpreter (``python -c pass``): what no lazy import can remove.
``metanet --help`` must answer in under a second; it can because the command imports
torch (and torch_geometric) only in the subcommand that runs. The import rows say what
each package costs on first import and whether it loads torch.

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0


# as a user's installation runs: with the bytecode cache (a first, untimed run fills it)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(cmd: list[str], repeats: int) -> float:
    """Median wall time of ``cmd`` over fresh processes (output discarded)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run(
            cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
        )
        if i == 0:
            continue
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _import(module: str, repeats: int) -> tuple[float, bool]:
    """Median time of ``import module`` in a fresh interpreter, and whether torch came too."""
    code = (
        f"import sys, time; t = time.perf_counter(); import {module}; "
        "print(time.perf_counter() - t, 'torch' in sys.modules)"
    )
    times, torch_loaded = [], False
    for i in range(repeats + 1):
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=ENV
        ).stdout.split()
        if i == 0:
            continue
        times.append(float(out[0]))
        torch_loaded = out[1] == "True"
    return statistics.median(times), torch_loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per row")
    args = parser.parse_args(argv)
    script = shutil.which("metanet")
    if script is None:
        sys.exit(
            "benchmarks/startup.py: the metanet console script is not installed (pip install -e .)"
        )
    bare = _wall([sys.executable, "-c", "pass"], args.repeats)
    help_s = _wall([script, "--help"], args.repeats)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, median of {args.repeats} "
        "fresh processes (after one untimed run that fills the bytecode cache)"
    )
    print()
    print("| what | time (s) | loads torch |")
    print("|---|---:|---|")
    print(f"| python -c pass (baseline) | {bare:.2f} | no |")
    print(f"| metanet --help | {help_s:.2f} | no |")
    # metanet.graph: what the CLI imported eagerly before (torch + torch_geometric)
    for module in ("metanet", "converters", "tasks", "metanet.graph"):
        seconds, torch_loaded = _import(module, args.repeats)
        print(f"| import {module} | {seconds:.3f} | {'yes' if torch_loaded else 'no'} |")
    verdict = "meets" if help_s < TARGET_S else "misses"
    print(f"\nmetanet --help: {help_s:.2f} s, {verdict} the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
