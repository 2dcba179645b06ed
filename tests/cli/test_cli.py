"""The metanet CLI, called in-process and as the installed console script."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from metanet.cli import main
from tests.fixtures.zoo import family_models


def test_create_then_inspect(tmp_path, capsys):
    out = tmp_path / "cnn.safetensors"
    assert main(["create", "cnn", "-o", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 groups" not in text  # 3 conv groups in the default cnn
    assert "3 groups" in text and "free permutation dims" in text
    assert main(["inspect", str(out), "--tensors"]) == 0
    assert "running_var" in capsys.readouterr().out
    assert main(["graph", str(out)]) == 0
    assert "edges" in capsys.readouterr().out


def test_create_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["create", "mlp", "-o", str(out)]) == 0
    before = out.read_bytes()
    assert main(["create", "mlp", "-o", str(out), "--seed", "1"]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_inspect_plain_checkpoint_needs_family(tmp_path, capsys):
    sd = family_models()[0][2].state_dict()
    p = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    assert main(["inspect", str(p)]) == 2
    assert "--family" in capsys.readouterr().err
    assert main(["inspect", str(p), "--family", "mlp"]) == 0
    assert "2 groups" in capsys.readouterr().out
    torch.save(sd, tmp_path / "plain.pt")
    assert main(["inspect", str(tmp_path / "plain.pt"), "--family", "mlp", "--json"]) == 0
    assert '"metanet.WeightSpace/1"' in capsys.readouterr().out


def test_inspect_corrupt_file(tmp_path, capsys):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(b"garbage")
    assert main(["inspect", str(p)]) == 2
    assert "broken.safetensors" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("metanet") is None, reason="console script not installed")
def test_console_script(tmp_path):
    out = tmp_path / "s.safetensors"
    subprocess.run(["metanet", "create", "siren", "-o", str(out)], check=True)
    res = subprocess.run(
        ["metanet", "inspect", str(out)], check=True, capture_output=True, text=True
    )
    assert "sign" in res.stdout
