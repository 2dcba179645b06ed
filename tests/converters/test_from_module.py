"""converters.from_module on the reference zoo: the symmetry found is real and complete."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import converters
from converters import ConverterWarning, from_module
from metanet.testing import assert_function_preserved
from tests.fixtures.architectures import ZOO
from tests.helpers import converted

IDS = [e.name for e in ZOO]


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_five_elements_preserve_outputs(entry):
    model, inputs, space = converted(entry)
    assert space.groups
    err = assert_function_preserved(model, space, inputs, n=5, rtol=1e-9, dtype=None)
    assert err < 1e-9


@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_hand_count_reached(entry):
    _, _, space = converted(entry)
    assert space.free_dims() == entry.hand_count, entry.hand_count_note


@pytest.mark.parametrize(
    "name,heads,head_dim",
    [
        ("vit_tiny", 4, 8),
        ("transformer_lm", 4, 8),
        ("hf_gpt2_tiny", 4, 8),
        ("hf_minilm", 12, 32),
    ],
)
def test_heads_permute_as_heads_and_within_heads(name, heads, head_dim):
    entry = next(e for e in ZOO if e.name == name)
    _, _, space = converted(entry)
    indexed = [g for g in space.groups.values() if g.within is not None]
    # per layer: q/k head_dim and v head_dim, each indexed by that layer's heads
    assert indexed and all(g.size == head_dim for g in indexed)
    assert all(space.groups[g.within].size == heads for g in indexed)
    element = space.random_element(torch.Generator().manual_seed(0))
    assert any(len({tuple(r.tolist()) for r in element[g.name]}) > 1 for g in indexed)


def test_rotary_fixes_query_key_head_dim():
    entry = next(e for e in ZOO if e.name == "hf_llama_tiny")
    _, _, space = converted(entry)
    q = next(t for n, t in space.tensors.items() if n.endswith("layers.0.self_attn.q_proj.weight"))
    k = next(t for n, t in space.tensors.items() if n.endswith("layers.0.self_attn.k_proj.weight"))
    # q rows: kv head × q head within its kv group × head_dim (fixed by rotary)
    assert [f.group is None for f in q.axes[0].segments[0]] == [False, False, True]
    assert [f.group is None for f in k.axes[0].segments[0]] == [False, True]
    kv = q.axes[0].segments[0][0].group
    assert space.groups[q.axes[0].segments[0][1].group].within == kv


@torch.library.custom_op("metanet_test::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.tanh(x)


@scaled_tanh.register_fake
def _(x):
    return torch.empty_like(x)


class CustomActivationMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(scaled_tanh(self.fc1(x)))))


def test_unknown_op_is_fixed_with_a_warning_then_a_rule_recovers_it():
    torch.manual_seed(0)
    model = CustomActivationMLP().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with pytest.warns(ConverterWarning, match=r"metanet_test.scaled_tanh.*<top>"):
        space = from_module(model, x)
    assert space.free_dims() == 12  # fc1's 16 units lost
    assert_function_preserved(model, space, x, n=5, rtol=1e-9)

    def elementwise_odd(ctx, node):
        return ctx.elementwise(node, activation="odd")

    recovered = from_module(model, x, rules={"metanet_test::scaled_tanh": elementwise_odd})
    assert recovered.free_dims() == 16 + 12
    assert recovered.groups["fc1:0"].action == "sign"
    assert_function_preserved(model, recovered, x, n=5, rtol=1e-9)

    converters.register_rule("metanet_test::scaled_tanh")(elementwise_odd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConverterWarning)
            assert from_module(model, x) == recovered
    finally:
        converters.rules.RULES.pop("metanet_test.scaled_tanh")


def test_an_unsound_claim_would_be_caught():
    """Guard for the test above: the custom op really breaks a forced permutation."""
    torch.manual_seed(0)
    model = CustomActivationMLP().double()
    x = torch.randn(5, 6, dtype=torch.float64)

    def keeps_nothing(ctx, node):  # a wrong rule: output axes unrelated to the input
        return [ctx.alg.leaf(n) for n in ctx.out_shape(node)]

    wrong = from_module(model, x, rules={"metanet_test::scaled_tanh": keeps_nothing})
    with pytest.raises(AssertionError, match="claims a symmetry"):
        assert_function_preserved(model, wrong, x, n=5, rtol=1e-9)


def test_training_mode_is_restored_and_state_dict_order_kept():
    entry = next(e for e in ZOO if e.name == "cnn_bn")
    model = entry.build()
    model.train()
    space = from_module(model, entry.inputs())
    assert model.training
    assert list(space.tensors) == list(model.state_dict())
    assert space["features.1.num_batches_tracked"].kind == "buffer"


@pytest.mark.parametrize(
    "name,action",
    [("mlp", "positive_scale"), ("siren", "sign"), ("transformer_lm", None)],
)
def test_scaling_annotations_follow_the_activation(name, action):
    entry = next(e for e in ZOO if e.name == name)
    _, _, space = converted(entry)
    plain = [g for g in space.groups.values() if g.within is None and g.size > 8]
    if name == "transformer_lm":  # GELU MLP units and a LayerNorm'd stream: no scaling
        assert {g.action for g in plain} == {None}
    else:
        assert {g.action for g in plain} == {action}


class FusedQKVReused(nn.Module):
    """Selects q, k, v from a fused projection and then reads the stale fused tensor
    again (channel 0 of every head): the per-segment symmetry must give way."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, 4)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, t, d)) + qkv[..., 0].sum(
            dim=(0, 2)
        ).unsqueeze(-1)


def test_stale_fused_axis_pins_its_segments():
    torch.manual_seed(0)
    model = FusedQKVReused().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    space = from_module(model, x)
    assert_function_preserved(model, space, x, n=10, rtol=1e-9)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_gives_a_clear_error():
    with pytest.raises(
        converters.ConverterError, match="torch.export could not trace DataDependent"
    ):
        from_module(DataDependent(), torch.randn(2, 4))
