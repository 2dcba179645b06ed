"""metanet: learning on and with neural network weights.

One flow: checkpoint -> converters -> :class:`WeightSpace` -> graph / UNF / tasks.

The public names below are imported on first use (module ``__getattr__``, PEP 562), so
``import metanet`` and the ``metanet`` command start without loading torch or
torch_geometric; ``from metanet import to_graph`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "apply_signs": "metanet.canonical",
    "canonicalize_sign": "metanet.canonical",
    "random_signs": "metanet.canonical",
    "sign_groups": "metanet.canonical",
    "GraphGather": "metanet.graph",
    "ParamGraph": "metanet.graph",
    "node_permutation": "metanet.graph",
    "to_graph": "metanet.graph",
    "to_weights": "metanet.graph",
    "CheckpointError": "metanet.io",
    "load": "metanet.io",
    "load_state_dict": "metanet.io",
    "save": "metanet.io",
    "probe_features": "metanet.probe",
    "with_probes": "metanet.probe",
    "SymmetryCertificate": "metanet.testing",
    "symmetry_certificate": "metanet.testing",
    "Axis": "metanet.space",
    "NormScale": "metanet.space",
    "Element": "metanet.space",
    "Factor": "metanet.space",
    "Group": "metanet.space",
    "NeuronSet": "metanet.space",
    "TensorSpec": "metanet.space",
    "WeightSpace": "metanet.space",
    "WeightSpaceError": "metanet.space",
}

# spelled out (not sorted(_EXPORTS)) so linters see the public names
__all__ = [
    "Axis",
    "CheckpointError",
    "Element",
    "Factor",
    "GraphGather",
    "Group",
    "NeuronSet",
    "NormScale",
    "ParamGraph",
    "SymmetryCertificate",
    "TensorSpec",
    "WeightSpace",
    "WeightSpaceError",
    "apply_signs",
    "canonicalize_sign",
    "load",
    "load_state_dict",
    "node_permutation",
    "probe_features",
    "random_signs",
    "save",
    "sign_groups",
    "symmetry_certificate",
    "to_graph",
    "to_weights",
    "with_probes",
]

if TYPE_CHECKING:  # static checkers and IDEs see the names without the lazy lookup
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metanet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
