"""Checkpoint -> :class:`metanet.WeightSpace`."""

from converters.state_dict import FAMILIES, activation_action, from_state_dict

__all__ = ["FAMILIES", "activation_action", "from_state_dict"]
