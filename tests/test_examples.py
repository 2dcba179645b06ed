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
