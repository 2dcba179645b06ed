"""metanet: learning on and with neural network weights.

One flow: checkpoint -> converters -> :class:`WeightSpace` -> graph / UNF / tasks.
"""

from metanet.canonical import apply_signs, canonicalize_sign, random_signs, sign_groups
from metanet.graph import GraphGather, ParamGraph, node_permutation, to_graph, to_weights
from metanet.io import CheckpointError, load, load_state_dict, save
from metanet.space import (
    Axis,
    Element,
    Factor,
    Group,
    NeuronSet,
    TensorSpec,
    WeightSpace,
    WeightSpaceError,
)

__version__ = "0.1.0"

__all__ = [
    "Axis",
    "CheckpointError",
    "Element",
    "Factor",
    "GraphGather",
    "Group",
    "NeuronSet",
    "ParamGraph",
    "TensorSpec",
    "WeightSpace",
    "WeightSpaceError",
    "apply_signs",
    "canonicalize_sign",
    "load",
    "load_state_dict",
    "node_permutation",
    "random_signs",
    "save",
    "sign_groups",
    "to_graph",
    "to_weights",
]
