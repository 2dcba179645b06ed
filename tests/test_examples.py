"""The example scripts run (short settings); README's main job runs the alignment one."""

from __future__ import annotations

import runpy
import sys

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
