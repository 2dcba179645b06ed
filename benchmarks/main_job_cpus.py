"""The main job under every CPU instruction set torch can pick, each checked against README.

Runs ``examples/align_and_merge.py`` in a fresh process per setting, with
``ATEN_CPU_CAPABILITY`` set to ``default`` (no vectorization), ``avx2`` and ``avx512``, and
once with neither it nor ``MKL_CBWR`` set (what a user's machine does), then runs CI's
check (``.ci/readme_table.py``) on each output. Writes one line per setting: the
instruction set torch reports, whether the check passed, and how far the run's means lie
from README's (the band README states is what the check accepts).

    python benchmarks/main_job_cpus.py --jobs 2    # ~3 min on 2 cores
    # -> benchmarks/results/main_job_cpus.md
"""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["default", "avx2", "avx512", None]  # None: ATEN_CPU_CAPABILITY and MKL_CBWR unset


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_one(capability: str | None, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = (
        "import runpy, sys, torch; "
        "print('capability:', torch.backends.cpu.get_cpu_capability()); "
        f"sys.argv = ['align_and_merge.py', '--out', {str(out)!r}]; "
        f"runpy.run_path({str(ROOT / 'examples' / 'align_and_merge.py')!r}, run_name='__main__')"
    )
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"ATEN_CPU_CAPABILITY={capability}: the job failed\n{run.stderr}")
    used = next(
        line.split(":", 1)[1].strip()
        for line in run.stdout.splitlines()
        if line.startswith("capability:")
    )
    return {"capability": capability, "used": used, "stdout": run.stdout, "wall": wall}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="settings run at once")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "main_job_cpus.md"))
    args = parser.parse_args(argv)
    check = runpy.run_path(str(ROOT / ".ci" / "readme_table.py"))
    readme = (ROOT / "README.md").read_text()
    band = check["band"](readme)
    shown = next(t for t in check["_tables"](readme) if t[0][:2] == ["model", "method"])
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: run_one(s, Path(tmp) / str(s)), SETTINGS))
    lines = [
        f"Main job (`examples/align_and_merge.py`) on {_cpu_name()}, {os.cpu_count()} cores, "
        f"torch one thread per run, {args.jobs} runs at a time; CI's band: ±{band['barrier']} "
        f"barrier, ±{band['midpoint acc.']} midpoint accuracy.",
        "",
        "| ATEN_CPU_CAPABILITY | MKL_CBWR | torch uses | CI check | largest shift, barrier "
        "| largest shift, midpoint acc. | wall (s) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        (table,) = check["_tables"](r["stdout"])[:1]
        deltas = {}
        for col in ("barrier", "midpoint acc."):
            i = table[0].index(col)
            deltas[col] = max(
                abs(check["_mean"](g[i]) - check["_mean"](w[i]))
                for g, w in zip(table[1:], shown[1:])
            )
        problems = check["compare"](r["stdout"], readme)
        verdict = "pass" if not problems else "FAIL: " + "; ".join(problems)
        lines.append(
            f"| {r['capability'] or '(unset)'} | (unset) | {r['used']} | {verdict} "
            f"| {deltas['barrier']:.3f} | {deltas['midpoint acc.']:.3f} | {r['wall']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    if any("FAIL" in line for line in lines):
        sys.exit(1)


if __name__ == "__main__":
    main()
