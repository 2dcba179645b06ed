"""benchmarks/learned_opt.py runs end to end at tiny sizes (so the script cannot rot)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("learned_opt", None)
    import learned_opt as bench

    out, plot = tmp_path / "lo.md", tmp_path / "lo.png"
    bench.main(
        ["--families", "mlp", "--meta-steps", "1", "--horizon", "4", "--unroll", "2",
         "--tasks", "2", "--work", str(tmp_path / "w"), "--out", str(out), "--plot", str(plot),
         "--quiet"]
    )  # fmt: skip
    text = out.read_text()
    for label in (
        "Adam (lr",
        "SGDM (lr",
        "per-parameter LO",
        "UNF LO",
        "GMN LO",
        "unseen width 48",
    ):
        assert label in text, label
    assert plot.exists() and (tmp_path / "w" / "mlp-UNF.safetensors").exists()
