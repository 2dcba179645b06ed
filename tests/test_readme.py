"""Every snippet in README runs, and .ci/run runs README's two commands."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

from metanet.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
        printed = out.getvalue().strip()
        if "print(space.summary())" in code:
            # the README shows what summary() prints: keep it true
            shown = re.search(r"`summary\(\)` prints:\n\n```\n(.*?)```", README, flags=re.S)
            assert shown and shown.group(1).strip() == printed


def test_cli_snippets_run(tmp_path, monkeypatch, capsys):
    """The CLI tour, run in-process (plain.pt is made here first)."""
    import torch

    monkeypatch.chdir(tmp_path)
    from tests.fixtures.zoo import CNN

    torch.save(CNN().state_dict(), "plain.pt")
    tour = next(b for b in _blocks("bash") if "metanet create mlp" in b)
    for line in tour.strip().splitlines():
        words = shlex.split(line.split("#")[0])
        words = [w for w in words if not (w.startswith("[") or w.endswith("]"))]
        assert words[0] == "metanet"
        assert main(words[1:]) == 0, line


def test_ci_runs_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- install -->" in ci and "<!-- test -->" in ci
    for marker in ("install", "test"):
        block = re.search(
            rf"<!-- {marker} -->\n```bash\n(.*?)\n```\n<!-- /{marker} -->", README, flags=re.S
        )
        assert block, f"README lacks the {marker} command"
        assert len(block.group(1).strip().splitlines()) == 1


def test_align_cli_snippets_run(tmp_path, monkeypatch, capsys):
    """The align/merge/barrier tour, on checkpoints shaped like the main job's."""
    import torch

    import metanet
    from converters import from_module
    from tasks import digits

    monkeypatch.chdir(tmp_path)
    d = digits.load().flat()
    for name, seed in (("mlp_a", 0), ("mlp_b", 1)):
        torch.manual_seed(seed)
        model = digits.train(digits.mlp(), d, epochs=1, batch_size=128, seed=seed)
        metanet.save(
            f"align_out/{name}.safetensors", model.state_dict(), from_module(model, d.x_train[:2])
        )
    tour = next(b for b in _blocks("bash") if "metanet align" in b)
    for line in tour.strip().splitlines():
        words = shlex.split(line.split("#")[0])
        assert words[0] == "metanet"
        assert main(words[1:]) == 0, line
    assert Path("b_aligned.safetensors").exists() and Path("barrier.png").exists()
    assert "aligned: barrier" in capsys.readouterr().out


def test_main_job_is_the_alignment_example():
    block = re.search(r"<!-- install -->\n```bash\n(.*?)\n```", README, flags=re.S).group(1)
    assert "examples/align_and_merge.py" in block
