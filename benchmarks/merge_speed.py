"""The checkpoint engine beside mergekit at size, and beside the disk's own limit.

* **Time to the first written tensor** on a 40-layer tiny Llama (the comparison
  benchmark's): both CLIs on the same linear-merge YAML, each in a fresh process; a thread
  polls the output folder every 2 ms for the first safetensors bytes on disk (ours writes
  each tensor as it is merged; mergekit buffers a shard).
* **A 1.1B Llama pair** (TinyLlama's shape, random init, float32, 4.1 GiB each, sharded at
  2 GB; ``benchmarks/scale.py`` makes the same pair): a plain linear merge, no alignment,
  whole time and peak RSS for ``metanet merge --config`` and ``mergekit-yaml``.
* **The floor** of that merge, an I/O job: reading the two inputs and writing one output of
  the same size on the same disk, in one process (``cat`` the inputs, write the bytes),
  measured in the same run. Every run starts with a cold page cache (``drop_caches``) when
  the machine allows it; the table says whether it did.

    python benchmarks/merge_speed.py --work /path/with/20GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RUNNER = (
    "import resource, subprocess, sys, time, json\n"
    "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(json.dumps({'rc': r.returncode, 'time_s': time.perf_counter() - t, "
    "'peak_rss_gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, "
    "'stderr': r.stderr[-1500:]}))\n"
)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str], watch: Path | None = None) -> dict:
    """Run ``cmd`` in a fresh process (peak RSS of the child); with ``watch``, also the
    time until the first safetensors bytes appear under that folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    first = {}
    start = time.perf_counter()
    done = threading.Event()

    def poll():
        while not done.is_set():
            if watch is not None and watch.parent.exists():
                for p in list(watch.parent.rglob("*")):
                    if ".safetensors" in p.name and p.is_file() and p.stat().st_size > 4096:
                        if watch.name in str(p.relative_to(watch.parent)).split(os.sep)[0]:
                            first.setdefault("s", time.perf_counter() - start)
                            return
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out = subprocess.run([sys.executable, "-c", RUNNER, *cmd], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    done.set()
    thread.join()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["first_tensor_s"] = first.get("s")
    return result


def floor(inputs: list[Path], out: Path, nbytes: int) -> float:
    """Seconds to read every input byte and write ``nbytes`` to ``out`` (buffered, as the
    merge tools write)."""
    start = time.perf_counter()
    for folder in inputs:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    block = b"\0" * (1 << 24)
    with open(out, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= len(block)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/metanet-merge-speed")
    ap.add_argument("--mergekit-venv", default="/work/venv-mergekit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_speed.md"))
    ap.add_argument("--skip-large", action="store_true", help="only the 40-layer model")
    args = ap.parse_args(argv)
    import yaml
    from mergekit_compare import make_models
    from scale import SHAPE, make_pair

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mk = str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml")
    ours = [sys.executable, "-m", "metanet.cli", "merge", "--config"]
    lines = []

    # ---------------------------------------------------------------- first tensor
    small = work / "small"
    if not (small / "b" / "config.json").is_file():
        make_models(small)
    cfg = work / "small.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [  # mergekit needs weights
        {"model": str(small / m), "parameters": {"weight": 0.5}} for m in ("a", "b")]}))  # fmt: skip
    rows = {}
    for name, cmd in (("metanet", ours), ("mergekit", [mk])):
        out = work / f"small_{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        argv_ = [*cmd, str(cfg), "-o", str(out), "-q"] if name == "metanet" else [
            mk, str(cfg), str(out)]  # fmt: skip
        rows[name] = run(argv_, watch=out)
        print(name, json.dumps(rows[name]), flush=True)
    lines += [
        "**Time to the first written tensor**, linear merge of two 40-layer tiny Llamas "
        "(fresh processes, start-up included):",
        "",
        "| tool | first tensor on disk (s) | whole merge (s) | peak RSS (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        first = f"{r['first_tensor_s']:.2f}" if r["first_tensor_s"] is not None else "–"
        lines.append(f"| {name} | {first} | {r['time_s']:.2f} | {r['peak_rss_gib']:.2f} |")

    # ---------------------------------------------------------------- 1.1B pair
    if not args.skip_large:
        a, b = make_pair(work, SHAPE, quiet=True)
        cfg = work / "large.yml"
        cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
            {"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)]}))  # fmt: skip
        big = {}
        cold = True
        for name in ("floor", "metanet", "mergekit"):
            out = work / f"large_{name}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cold = drop_caches() and cold
            if name == "floor":
                big[name] = {"time_s": floor([a, b], out, size_of(a)), "peak_rss_gib": None}
            elif name == "metanet":
                big[name] = run([*ours, str(cfg), "-o", str(out), "-q"])
            else:
                big[name] = run([mk, str(cfg), str(out)])
            print(name, json.dumps({k: v for k, v in big[name].items() if k != "stderr"}),
                  flush=True)  # fmt: skip
        fl = big["floor"]["time_s"]
        lines += [
            "",
            f"**A 1.1B Llama pair** (float32, {size_of(a) / 2**30:.1f} GiB each), linear "
            f"merge, no alignment; page cache dropped before each run: {'yes' if cold else 'no'}:",
            "",
            "| run | time (s) | vs the floor | peak RSS (GiB) |",
            "|---|---:|---:|---:|",
            f"| floor: read both inputs, write one output | {fl:.1f} | 1.00× | – |",
        ]
        for name in ("metanet", "mergekit"):
            r = big[name]
            ok = "" if r["rc"] == 0 else " (failed)"
            lines.append(f"| {name}{ok} | {r['time_s']:.1f} | {r['time_s'] / fl:.2f}× "
                         f"| {r['peak_rss_gib']:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
