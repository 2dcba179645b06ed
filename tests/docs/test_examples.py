"""The example scripts run (short settings); README's main job runs the alignment one."""

from __future__ import annotations

import runpy
import sys

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


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
    argv = ["align_and_merge.py", "--out", str(out), "--epochs", "1", "--ste-epochs", "0",
            "--models", "3"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "examples" / "align_and_merge.py"), run_name="__main__")
    return capsys.readouterr().out


def test_align_example_is_repeatable_and_prints_readme_rows(tmp_path, capsys, monkeypatch):
    """Two short runs (3 networks per model, so 3 pairs) print the same table, times
    aside, with README's header and rows (STE skipped here), and the run leaves the
    caller's thread count alone."""
    import torch

    check = runpy.run_path(str(ROOT / ".ci" / "readme_table.py"))
    threads = torch.get_num_threads()
    first = _align_example(tmp_path / "a", capsys, monkeypatch)
    second = _align_example(tmp_path / "b", capsys, monkeypatch)
    assert torch.get_num_threads() == threads
    assert "mean ± std over 3 pairs of 3 networks per model" in first
    tables = [check["_tables"](text)[0] for text in (first, second)]
    assert [r[:-1] for r in tables[0]] == [r[:-1] for r in tables[1]]  # all but the times
    printed = tables[0]
    readme = (ROOT / "README.md").read_text()
    shown = next(t for t in check["_tables"](readme) if t[0] == printed[0])
    assert [r[:2] for r in printed] == [r[:2] for r in shown if r[1] != "STE"]
    assert all("±" in cell for row in printed[1:] for cell in row[2:4])
    assert (tmp_path / "a" / "barriers.png").exists()
    assert (tmp_path / "a" / "mlp_b_aligned.safetensors").exists()


def test_align_example_needs_two_models(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "examples" / "align_and_merge.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x"), "--models", "1"])
    assert e.value.code == 2 and "--models must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
