"""metanet.save / metanet.load: bit-exact, atomic, and loud about bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import metanet
import metanet.io
from converters import from_state_dict
from metanet import CheckpointError, WeightSpaceError
from tests.fixtures.zoo import family_models


@pytest.fixture
def checkpoint(tmp_path):
    name, family, model, _ = next(m for m in family_models() if m[0] == "cnn_bn")
    sd = model.state_dict()
    space = from_state_dict(sd, family)
    path = tmp_path / "cnn.safetensors"
    metanet.save(path, sd, space)
    return path, sd, space


def test_round_trip_bit_exact(checkpoint, tmp_path):
    path, sd, space = checkpoint
    weights, space2 = metanet.load(path)
    assert space2 == space
    assert weights.keys() == sd.keys()
    for k in sd:
        assert weights[k].dtype == sd[k].dtype
        assert torch.equal(weights[k], sd[k])
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    space64 = from_state_dict(sd64, "cnn")
    metanet.save(tmp_path / "f64.safetensors", sd64, space64)
    w64, _ = metanet.load(tmp_path / "f64.safetensors")
    assert all(torch.equal(w64[k], sd64[k]) for k in sd64)


def test_truncated_file_names_the_file(checkpoint):
    path, _, _ = checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cnn\.safetensors.*truncated or corrupt"):
        metanet.load(path)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"cnn\.safetensors"):
        metanet.load(path)


def test_wrong_shape_names_file_and_tensor(checkpoint, tmp_path):
    path, sd, space = checkpoint
    bad = dict(sd)
    bad["features.3.weight"] = torch.zeros(16, 8, 5, 5)
    bad_path = tmp_path / "bad.safetensors"
    save_file(
        {k: v.contiguous() for k, v in bad.items()},
        str(bad_path),
        metadata={metanet.io.SPACE_KEY: space.to_json()},
    )
    with pytest.raises(
        CheckpointError,
        match=r"bad\.safetensors: tensor 'features\.3\.weight' has shape \(16, 8, 5, 5\)",
    ):
        metanet.load(bad_path)


def test_missing_tensor_and_missing_space(checkpoint, tmp_path):
    path, sd, space = checkpoint
    partial = {k: v.contiguous() for k, v in sd.items() if k != "head.0.bias"}
    p = tmp_path / "partial.safetensors"
    save_file(partial, str(p), metadata={metanet.io.SPACE_KEY: space.to_json()})
    with pytest.raises(
        CheckpointError, match=r"partial\.safetensors: tensor 'head\.0\.bias'.*missing"
    ):
        metanet.load(p)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(plain))
    with pytest.raises(CheckpointError, match="no WeightSpace"):
        metanet.load(plain)
    assert metanet.load_state_dict(plain).keys() == sd.keys()
    with pytest.raises(CheckpointError, match="no such file"):
        metanet.load(tmp_path / "nope.safetensors")


def test_interrupted_save_keeps_previous_file(checkpoint, monkeypatch):
    path, sd, space = checkpoint
    before = path.read_bytes()

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(metanet.io, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        metanet.save(path, {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, space)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_save_refuses_weights_that_do_not_fit(checkpoint, tmp_path):
    _, sd, space = checkpoint
    bad = dict(sd)
    bad["head.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightSpaceError, match="'head.0.weight'"):
        metanet.save(tmp_path / "x.safetensors", bad, space)
    assert not (tmp_path / "x.safetensors").exists()


def test_pt_files_load_weights_only(tmp_path):
    sd = family_models()[0][2].state_dict()
    torch.save(sd, tmp_path / "m.pt")
    loaded = metanet.load_state_dict(tmp_path / "m.pt")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        metanet.load_state_dict(tmp_path / "evil.pt")


def test_pt_of_another_pickle_protocol_is_named_in_one_line(tmp_path, recwarn):
    """torch's weights-only unpickler cannot read a protocol-4 pickle: one error saying so
    and what to do, without torch's two-line note on stderr."""
    sd = family_models()[0][2].state_dict()
    torch.save(sd, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(CheckpointError, match="p4.pt: pickled with protocol 4.*re-save"):
        metanet.load_state_dict(tmp_path / "p4.pt")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_saved_files_honour_the_umask(tmp_path):
    import os

    from metanet.io import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x", lambda p: open(p, "w").write("x"))
        # safetensors writes a new file and renames it over the one it was given
        sd = {"0.weight": torch.ones(3, 2), "0.bias": torch.zeros(3)}
        sd |= {"2.weight": torch.ones(1, 3), "2.bias": torch.zeros(1)}
        metanet.save(tmp_path / "m.safetensors", sd, from_state_dict(sd, "mlp"))
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
