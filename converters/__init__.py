"""Checkpoint -> :class:`metanet.WeightSpace`."""

from converters.module import ConverterError, ConverterWarning, from_module
from converters.pretrained import from_pretrained, hf_model, load_pretrained
from converters.rules import register_rule
from converters.state_dict import FAMILIES, activation_action, from_state_dict

__all__ = [
    "FAMILIES",
    "ConverterError",
    "ConverterWarning",
    "activation_action",
    "from_module",
    "from_pretrained",
    "hf_model",
    "load_pretrained",
    "from_state_dict",
    "register_rule",
]
