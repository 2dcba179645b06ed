"""The example scripts run (short settings); README's main job runs the alignment one."""

from __future__ import annotations

import runpy
import sys

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_teleport_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["teleport.py", "--out", str(tmp_path), "--steps", "120"])
    runpy.run_path(str(ROOT / "examples" / "teleport.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "SGD + teleport" in text and "teleports: 4" in text
    assert (tmp_path / "teleport.png").exists()


def test_learned_optimizer_example(tmp_path, monkeypatch, capsys):
    """A short run meta-trains, resumes from its checkpoint when run again with more
    steps, trains fresh networks of every width (the unseen one too) and plots."""
    args = ["learned_optimizer.py", "--out", str(tmp_path), "--horizon", "12", "--tasks", "2"]
    monkeypatch.setattr(sys, "argv", [*args, "--steps", "3", "--quiet"])
    runpy.run_path(str(ROOT / "examples" / "learned_optimizer.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", [*args, "--steps", "5", "--quiet"])
    runpy.run_path(str(ROOT / "examples" / "learned_optimizer.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "resumed from meta-step 3" in text
    assert "width  48 (unseen)" in text and "UNF learned" in text
    assert (tmp_path / "learned_optimizer.png").exists()
    assert (tmp_path / "unf_lo.safetensors").exists()


def _align_example(out, capsys, monkeypatch) -> str:
    argv = ["align_and_merge.py", "--out", str(out), "--epochs", "1", "--ste-epochs", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "examples" / "align_and_merge.py"), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.slow  # two short runs: ~2 min on a loaded 2-core box; CI checks the full run
def test_align_example_is_deterministic_and_prints_readme_table(tmp_path, capsys, monkeypatch):
    """Two short runs print the same table (times aside), with README's header and rows
    (STE skipped here), and the run leaves the caller's thread count alone."""
    import torch

    compare = runpy.run_path(str(ROOT / ".ci" / "readme_table.py"))
    threads = torch.get_num_threads()
    first = _align_example(tmp_path / "a", capsys, monkeypatch)
    second = _align_example(tmp_path / "b", capsys, monkeypatch)
    assert torch.get_num_threads() == threads
    assert compare["compare"](first, second) == []
    (printed,) = compare["_tables"](first)[:1]
    readme = (ROOT / "README.md").read_text()
    shown = next(t for t in compare["_tables"](readme) if t[0] == printed[0])
    assert [r[:2] for r in printed] == [r[:2] for r in shown if r[1] != "STE"]
    assert (tmp_path / "a" / "barriers.png").exists()
    assert (tmp_path / "a" / "mlp_b_aligned.safetensors").exists()
