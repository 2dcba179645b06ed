"""benchmarks/inr_classification.py runs end to end at toy sizes (so it does not rot)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tasks.datasets.inr import INRConfig, make_dataset

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "inr_classification", ROOT / "benchmarks" / "inr_classification.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_writes_its_table_and_plot(tmp_path):
    data = tmp_path / "inrs"
    make_dataset(
        data, per_image=1, cfg=INRConfig(hidden=8, depth=1, steps=5), num_shards=2, progress=False
    )
    out = tmp_path / "res" / "inr.md"
    bench = _bench()
    # one model of each input kind (weights, graphs) and each new option; all of them in
    # benchmarks/results (the whole default list takes minutes even at this size)
    models = "unf+sign+probe,transformer+sign,gmn,statnn+aug"
    argv = ["--data", str(data), "--epochs", "2", "--limit", "64", "--seeds", "2"]
    argv += ["--models", models, "--patience", "1", "--coords", "rotate=5,shift=0.05,contrast=0.2"]
    assert bench.main([*argv, "--batch-size", "32", "--hidden", "4", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "%" not in line]
    kinds = models.split(",")
    assert len(rows) == len(kinds) + 1  # and the render ceiling
    assert "render ceiling" in rows[0]
    for kind in kinds:
        assert bench._label(kind) in text
    assert "fixed random subset of 64" in text and "2 seed(s)" in text
    assert "CoordAugment(rotate=5.0, scale=0.1, shear=0.1, shift=0.05, contrast=0.2)" in text
    assert out.with_suffix(".png").stat().st_size > 0
    assert not list(out.parent.glob("*.tmp*"))  # atomic writes leave nothing behind


def test_benchmark_runs_file_resumes(tmp_path, monkeypatch):
    """``--runs``: every finished run is recorded, and a second invocation (another
    process, or a resumed one) reuses them instead of training again."""
    data = tmp_path / "inrs"
    make_dataset(
        data, per_image=1, cfg=INRConfig(hidden=8, depth=1, steps=5), num_shards=1, progress=False
    )
    runs = tmp_path / "runs.jsonl"
    bench = _bench()
    argv = ["--data", str(data), "--epochs", "1", "--limit", "64", "--seeds", "2", "--no-ceiling"]
    argv += ["--batch-size", "32", "--hidden", "4", "--models", "statnn,scalegmn"]
    argv += ["--runs", str(runs)]
    assert bench.main([*argv, "--out", str(tmp_path / "a.md")]) == 0
    assert len(runs.read_text().splitlines()) == 4

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(bench, "train", no_training)
    assert bench.main([*argv, "--out", str(tmp_path / "b.md")]) == 0
    table = [s for s in (tmp_path / "b.md").read_text().splitlines() if s.startswith("| ")]
    assert table == [s for s in (tmp_path / "a.md").read_text().splitlines() if s.startswith("| ")]
    assert "ScaleGMN" in (tmp_path / "b.md").read_text()
    # runs made with other settings are another table's: never mixed in, trained anew
    trained = []

    def record(*a, **k):
        trained.append(k["hidden"])
        raise SystemExit(0)

    monkeypatch.setattr(bench, "train", record)
    wider = [("6" if a == "4" and argv[k - 1] == "--hidden" else a) for k, a in enumerate(argv)]
    with pytest.raises(SystemExit):
        bench.main([*wider, "--out", str(tmp_path / "c.md")])
    assert trained == [6]
