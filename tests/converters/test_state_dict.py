"""converters.from_state_dict: the space found is the network's real symmetry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from converters import activation_action, from_state_dict
from metanet import Axis, Group, WeightSpace, WeightSpaceError
from metanet.testing import assert_function_preserved
from tests.fixtures.zoo import MLP, family_models

FAMILY_MODELS = family_models()
IDS = [name for name, *_ in FAMILY_MODELS]


def _activation(name: str) -> str | None:
    return "tanh" if "tanh" in name else None


@pytest.mark.parametrize("name,family,model,x", FAMILY_MODELS, ids=IDS)
def test_twenty_elements_preserve_function(name, family, model, x):
    sd = model.double().state_dict()
    space = from_state_dict(sd, family, activation=_activation(name))
    assert space.groups, "no symmetry found"
    err = assert_function_preserved(model, space, x, n=20, atol=1e-10)
    assert err < 1e-10
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = space.random_element(gen)
        back = space.apply(space.apply(sd, g), space.invert(g))
        assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name,family,model,x", FAMILY_MODELS, ids=IDS)
def test_wrong_space_is_caught(name, family, model, x):
    """A group put on the input axis claims a symmetry the network lacks."""
    sd = model.state_dict()
    space = from_state_dict(sd, family)
    first = next(t for t in space.tensors.values() if t.is_edge)
    n_in = first.shape[first.in_axis]
    axes = list(first.axes)
    axes[first.in_axis] = Axis.of("bogus_input", n_in)
    tensors = dict(space.tensors)
    tensors[first.name] = dataclasses.replace(first, axes=tuple(axes), in_set=None, in_axis=None)
    wrong = WeightSpace(
        {**space.groups, "bogus_input": Group("bogus_input", n_in)}, tensors, space.neuron_sets
    )
    with pytest.raises(AssertionError, match="claims a symmetry the network lacks"):
        assert_function_preserved(model, wrong, x, n=5)


def test_mlp_structure():
    sd = MLP((16, 32, 24, 5)).state_dict()
    space = from_state_dict(sd, "mlp")
    assert list(space.groups) == ["layers.0", "layers.2"]
    assert space.free_dims() == 32 + 24
    assert [s.kind for s in space.neuron_sets.values()] == ["input", "hidden", "hidden", "output"]
    assert space["layers.0.weight"].axes[1].is_fixed
    assert space["layers.4.weight"].axes[0].is_fixed
    assert space.groups["layers.0"].action == "positive_scale"


def test_cnn_batchnorm_roles_and_buffers():
    name, family, model, _ = next(m for m in FAMILY_MODELS if m[0] == "cnn_bn")
    space = from_state_dict(model.state_dict(), "cnn")
    assert space["features.1.running_var"].role == "running_var"
    assert space["features.1.running_var"].kind == "buffer"
    assert space["features.1.num_batches_tracked"].out_set is None
    assert space["features.1.num_batches_tracked"].dtype == "int64"
    assert space.free_dims() == 8 + 16 + 16 + 12


@pytest.mark.parametrize(
    "activation,action",
    [
        ("relu", "positive_scale"),
        ("LeakyReLU", "positive_scale"),
        ("tanh", "sign"),
        ("sin", "sign"),
        ("identity", "gl"),
        ("gelu", None),
        ("relu6", None),
    ],
)
def test_activation_annotation(activation, action):
    assert activation_action(activation) == action
    space = from_state_dict(MLP().state_dict(), "mlp", activation=activation)
    assert {g.action for g in space.groups.values()} == {action}


def test_errors_name_the_tensor():
    sd = MLP((4, 8, 3)).state_dict()
    sd["layers.2.weight"] = torch.zeros(3, 7)
    with pytest.raises(WeightSpaceError, match=r"'layers.2.weight' axis 1 has size 7"):
        from_state_dict(sd, "mlp")
    with pytest.raises(WeightSpaceError, match="unknown family 'resnet9000'"):
        from_state_dict(MLP().state_dict(), "resnet9000")
    conv = {"c.weight": torch.zeros(4, 2, 3, 3)}
    with pytest.raises(
        WeightSpaceError, match="family='mlp' expects Linear layers only; tensor 'c.weight'"
    ):
        from_state_dict(conv, "mlp")
    with pytest.raises(WeightSpaceError, match="family='siren' expects Linear layers only"):
        from_state_dict(conv, "siren")
    grouped = {
        "a.weight": torch.zeros(4, 1, 3, 3),
        "b.weight": torch.zeros(4, 2, 3, 3),
        "h.weight": torch.zeros(2, 4),
    }
    with pytest.raises(WeightSpaceError, match="'b.weight' axis 1 has 2 input channels"):
        from_state_dict(grouped, "cnn")
    flat = {"a.weight": torch.zeros(4, 1, 3, 3), "h.weight": torch.zeros(2, 36)}
    with pytest.raises(WeightSpaceError, match="expects global pooling"):
        from_state_dict(flat, "cnn")
