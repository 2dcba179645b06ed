"""WeightSpaces of state dicts whose model code is not at hand (weight datasets).

Families:

* ``"mlp"`` -- a stack of Linear layers (``*.weight`` 2-D, optional ``*.bias``) with any
  pointwise activation between them.
* ``"siren"`` -- the same structure with ``sin`` activations (sign symmetry).
* ``"cnn"`` -- convolutions (optionally each followed by BatchNorm, or another affine
  per-channel norm), global pooling, then a stack of Linear layers.

Modules are read in state-dict order; a module is the key prefix before the last dot.
A ``.safetensors`` file does not keep that order (its tensors are stored sorted), so
``order="natural"`` reads the modules by the numbers in their names instead (``0 < 2 <
10``, ``layer1.0.conv1`` before ``layer1.0.bn1`` before ``layer1.1``), a convolution or
Linear layer before the norm that shares its number, and (``cnn``) the Linear head last.
Hidden units of every layer but the last form one permutation group, named after the
module that produces them. Inputs and outputs are fixed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from metanet.space import (
    Axis,
    Group,
    NeuronSet,
    TensorSpec,
    WeightSpace,
    WeightSpaceError,
    _dtype_name,
)

__all__ = ["from_state_dict", "activation_action", "FAMILIES"]

FAMILIES = ("mlp", "siren", "cnn")

_POSITIVE_SCALE = {"relu", "leaky_relu", "leakyrelu", "prelu"}
_SIGN = {"tanh", "sin", "sine", "siren", "softsign", "hardtanh"}
_GL = {"identity", "linear", "none"}
# activations without a continuous symmetry of their own (the permutations remain)
_NO_SYMMETRY = {
    "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "sigmoid", "silu",
    "swish", "elu", "selu", "celu", "softplus", "mish", "relu6", "hardswish", "hardsigmoid",
    "logsigmoid",
}  # fmt: skip
# every name activation_action knows; the CLI refuses others (a typo would drop a symmetry)
KNOWN_ACTIVATIONS = frozenset(_POSITIVE_SCALE | _SIGN | _GL | _NO_SYMMETRY)


def activation_action(activation: str | None) -> str | None:
    """The continuous symmetry an activation allows each hidden neuron.

    ``relu``/``leaky_relu``: positive scaling; odd functions (``tanh``, ``sin``): sign;
    ``identity``: GL(n); anything else (``gelu``, ``sigmoid``, ``relu6`` ...): none
    (:data:`KNOWN_ACTIVATIONS` lists the names known either way).
    """
    if activation is None:
        return "gl"
    key = activation.lower().replace("-", "_")
    if key in _POSITIVE_SCALE:
        return "positive_scale"
    if key in _SIGN:
        return "sign"
    if key in _GL:
        return "gl"
    return None


@dataclass
class _Builder:
    """Collects groups, sets and tensor specs while a converter walks a network."""

    groups: list[Group] = field(default_factory=list)
    sets: list[NeuronSet] = field(default_factory=list)
    tensors: list[TensorSpec] = field(default_factory=list)

    def neuron_set(self, name: str, size: int, kind: str, layer: int, action: str | None) -> Axis:
        if kind == "hidden":
            self.groups.append(Group(name, size, action=action))
            axis = Axis.of(name, size)
        else:
            axis = Axis.fixed(size)
        self.sets.append(NeuronSet(name, axis, kind, layer))
        return axis

    def edge(
        self, name: str, w: Tensor, out_set: str, in_set: str, out_axis: int = 0, in_axis: int = 1
    ) -> None:
        axes = [Axis.fixed(n) for n in w.shape]
        axes[out_axis] = self._axis(out_set)
        axes[in_axis] = self._axis(in_set)
        self.tensors.append(
            TensorSpec(
                name,
                tuple(w.shape),
                tuple(axes),
                "weight",
                "parameter",
                _dtype_name(w.dtype),
                out_set,
                out_axis,
                in_set,
                in_axis,
            )
        )

    def node(self, name: str, w: Tensor, on: str, role: str, kind: str = "parameter") -> None:
        self.tensors.append(
            TensorSpec(
                name, tuple(w.shape), (self._axis(on),), role, kind, _dtype_name(w.dtype), on, 0
            )
        )

    def rest(self, name: str, w: Tensor, kind: str = "buffer") -> None:
        axes = tuple(Axis.fixed(n) for n in w.shape)
        self.tensors.append(
            TensorSpec(name, tuple(w.shape), axes, "other", kind, _dtype_name(w.dtype))
        )

    def _axis(self, set_name: str) -> Axis:
        return next(s.axis for s in self.sets if s.name == set_name)

    def build(self, notes: tuple[str, ...] = ()) -> WeightSpace:
        return WeightSpace.build(self.groups, self.tensors, self.sets, notes=notes)


def _modules(
    sd: Mapping[str, Tensor], natural: bool = False, head_last: bool = False
) -> list[tuple[str, dict[str, tuple[str, Tensor]]]]:
    """``[(prefix, {leaf: (full key, tensor)})]`` in state-dict order, or in natural order
    (see the module docstring)."""
    mods: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise WeightSpaceError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a Tensor"
            )
        prefix, _, leaf = key.rpartition(".")
        mods.setdefault(prefix, {})[leaf] = (key, value)
    if natural:
        rank = {"conv": 0, "linear": 0, "batchnorm": 1, "norm": 1}

        def key(item):
            prefix, leaves = item
            kind = _kind(leaves)
            numbers = tuple(int(n) for n in re.findall(r"\d+", prefix))
            return (head_last and kind == "linear", numbers, rank.get(kind, 2), prefix)

        return sorted(mods.items(), key=key)
    return list(mods.items())


def _kind(leaves: dict[str, tuple[str, Tensor]]) -> str:
    w = leaves.get("weight")
    if "running_mean" in leaves:
        return "batchnorm"
    if w is None:
        return "unknown"
    if w[1].dim() == 2:
        return "linear"
    if w[1].dim() >= 3:
        return "conv"
    if w[1].dim() == 1:
        return "norm"
    return "unknown"


def _add_linear_stack(
    b: _Builder, mods: list, prev: str, prev_size: int, layer: int, action: str | None
) -> None:
    for i, (prefix, leaves) in enumerate(mods):
        key, w = leaves["weight"]
        if w.shape[1] != prev_size:
            raise WeightSpaceError(
                f"tensor {key!r} axis 1 has size {w.shape[1]}, but the layer before produces "
                f"{prev_size} features ({prev!r})"
            )
        last = i == len(mods) - 1
        name = prefix or "linear"
        b.neuron_set(name, w.shape[0], "output" if last else "hidden", layer + i + 1, action)
        b.edge(key, w, name, prev)
        if "bias" in leaves:
            b.node(leaves["bias"][0], leaves["bias"][1], name, "bias")
        extra = set(leaves) - {"weight", "bias"}
        if extra:
            raise WeightSpaceError(f"module {prefix!r} has unexpected tensors {sorted(extra)}")
        prev, prev_size = name, w.shape[0]


def _mlp(
    sd: Mapping[str, Tensor], action: str | None, natural: bool = False, family: str = "mlp"
) -> WeightSpace:
    mods = _modules(sd, natural)
    if not mods:
        raise WeightSpaceError("empty state dict")
    for prefix, leaves in mods:
        if _kind(leaves) != "linear":
            key = next(iter(leaves.values()))[0]
            raise WeightSpaceError(
                f"family={family!r} expects Linear layers only; tensor {key!r} of module "
                f"{prefix!r} is not one (a 2-D weight with an optional bias)"
            )
    b = _Builder()
    in_size = mods[0][1]["weight"][1].shape[1]
    b.neuron_set("input", in_size, "input", 0, None)
    _add_linear_stack(b, mods, "input", in_size, 0, action)
    return b.build()


def _cnn(sd: Mapping[str, Tensor], action: str | None, natural: bool = False) -> WeightSpace:
    mods = _modules(sd, natural, head_last=True)
    kinds = [_kind(leaves) for _, leaves in mods]
    if "conv" not in kinds:
        raise WeightSpaceError("family='cnn' found no convolution (a weight with >= 3 axes)")
    first_linear = kinds.index("linear") if "linear" in kinds else len(kinds)
    b = _Builder()
    prefix0, leaves0 = mods[0]
    if kinds[0] != "conv":
        raise WeightSpaceError(f"family='cnn': the first module {prefix0!r} is not a convolution")
    in_ch = leaves0["weight"][1].shape[1]
    b.neuron_set("input", in_ch, "input", 0, None)
    prev, prev_size, layer = "input", in_ch, 0
    for (prefix, leaves), kind in zip(mods[:first_linear], kinds[:first_linear]):
        if kind == "conv":
            key, w = leaves["weight"]
            if w.shape[1] != prev_size:
                raise WeightSpaceError(
                    f"tensor {key!r} axis 1 has {w.shape[1]} input channels but {prev!r} gives "
                    f"{prev_size}: grouped/depthwise convolutions need converters.from_module"
                )
            layer += 1
            prev, prev_size = prefix, w.shape[0]
            b.neuron_set(prev, prev_size, "hidden", layer, action)
            b.edge(key, w, prev, b.sets[-2].name)
            if "bias" in leaves:
                b.node(leaves["bias"][0], leaves["bias"][1], prev, "bias")
            extra = set(leaves) - {"weight", "bias"}
        elif kind in ("batchnorm", "norm"):
            roles = {
                "weight": "norm_weight",
                "bias": "norm_bias",
                "running_mean": "running_mean",
                "running_var": "running_var",
            }
            for leaf, role in roles.items():
                if leaf in leaves:
                    key, w = leaves[leaf]
                    if tuple(w.shape) != (prev_size,):
                        raise WeightSpaceError(
                            f"tensor {key!r} has shape {tuple(w.shape)}, expected ({prev_size},) "
                            f"to normalise the channels of {prev!r}"
                        )
                    b.node(
                        key, w, prev, role, "buffer" if leaf.startswith("running") else "parameter"
                    )
            if "num_batches_tracked" in leaves:
                b.rest(*leaves["num_batches_tracked"])
            extra = set(leaves) - set(roles) - {"num_batches_tracked"}
        else:
            extra = set(leaves)
        if extra:
            raise WeightSpaceError(
                f"family='cnn': module {prefix!r} has tensors {sorted(extra)} that no "
                "conv/norm rule covers"
            )
    heads = mods[first_linear:]
    for prefix, leaves in heads:
        if _kind(leaves) != "linear":
            raise WeightSpaceError(
                f"family='cnn': module {prefix!r} after the first Linear layer is not Linear"
            )
    if not heads:
        raise WeightSpaceError("family='cnn' expects a Linear head after global pooling")
    head_in = heads[0][1]["weight"][1].shape[1]
    if head_in != prev_size:
        raise WeightSpaceError(
            f"tensor {heads[0][1]['weight'][0]!r} takes {head_in} features but the last "
            f"convolution {prev!r} has {prev_size} channels: family='cnn' expects global pooling"
        )
    _add_linear_stack(b, heads, prev, prev_size, layer, action)
    return b.build()


def from_state_dict(
    sd: Mapping[str, Tensor],
    family: str,
    activation: str | None = None,
    order: str = "given",
) -> WeightSpace:
    """The WeightSpace of a state dict of a known family.

    Args:
        sd: the state dict (order matters: layers are read in order).
        family: ``"mlp"``, ``"siren"`` or ``"cnn"``.
        activation: the hidden activation, for the groups' scaling/sign annotation
            (default ``"relu"``; ``"sin"`` for ``siren``).
        order: ``"given"`` (the dict's order: a model's ``state_dict()``, a ``.pt``) or
            ``"natural"`` (by the numbers in the module names: a ``.safetensors`` file,
            which stores its tensors sorted).

    Raises:
        WeightSpaceError: naming the tensor that does not fit the family.
    """
    if order not in ("given", "natural"):
        raise WeightSpaceError(f"order must be 'given' or 'natural', got {order!r}")
    natural = order == "natural"
    if family == "siren":
        return _mlp(sd, activation_action(activation or "sin"), natural, family="siren")
    if family == "mlp":
        return _mlp(sd, activation_action(activation or "relu"), natural)
    if family == "cnn":
        return _cnn(sd, activation_action(activation or "relu"), natural)
    raise WeightSpaceError(
        f"unknown family {family!r}; known: {', '.join(FAMILIES)} "
        "(for any nn.Module use converters.from_module)"
    )
