"""from_pretrained and `metanet inspect` on the real MiniLM folder and metanet checkpoints."""

from __future__ import annotations

import pytest
import torch

import metanet
from converters import from_module, from_pretrained, load_pretrained
from metanet import CheckpointError
from metanet.cli import main
from tests.fixtures.architectures import ZOO, minilm_dir

MINILM = next(e for e in ZOO if e.name == "hf_minilm")
needs_minilm = pytest.mark.skipif(not MINILM.available(), reason="needs metanet[hf]")


@needs_minilm
def test_minilm_folder(capsys):
    weights, space = load_pretrained(minilm_dir())
    assert space.free_dims() == MINILM.hand_count
    assert space.num_params == 22_713_216
    space.validate(weights)
    assert main(["inspect", str(minilm_dir())]) == 0
    out = capsys.readouterr().out
    assert "13896 free permutation dims" in out and "12×32" in out


def test_metanet_checkpoint_round_trip(tmp_path, capsys):
    entry = next(e for e in ZOO if e.name == "vit_tiny")
    model, x = entry.build(), entry.inputs()
    space = from_module(model, x)
    path = tmp_path / "vit.safetensors"
    metanet.save(path, model.state_dict(), space)
    assert from_pretrained(path) == space
    assert main(["inspect", str(path)]) == 0
    assert f"{space.free_dims()} free permutation dims" in capsys.readouterr().out


def factory():
    entry = next(e for e in ZOO if e.name == "resnet20")
    return entry.build(), entry.inputs()


def model_only():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))


def test_inspect_module_factory(capsys):
    assert main(["inspect", "tests.converters.test_pretrained:factory"]) == 0
    assert "448 free permutation dims" in capsys.readouterr().out
    assert main(["inspect", "tests.converters.test_pretrained:model_only"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert (
        main(["inspect", "tests.converters.test_pretrained:model_only", "--input-shape", "1,3,9,9"])
        == 0
    )
    assert "8 free permutation dims" in capsys.readouterr().out


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        from_pretrained(tmp_path / "missing.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        from_pretrained(tmp_path)
