"""One rule per ATen op: how channel variables flow through it.

A rule takes the :class:`Context` and the ``torch.fx`` node and returns the output's axis
variables (a list per tensor output, nested lists for tuples). The rules live by op
family:

==============================  ==============================================
module                          ops
==============================  ==============================================
:mod:`~.elementwise`            activations, arithmetic, constants, PReLU, GLU
:mod:`~.linear`                 linear, matmul, einsum, conv, embedding
:mod:`~.norms`                  batch/instance/layer/RMS/group norm
:mod:`~.attention`              softmax, scaled dot-product attention
:mod:`~.pooling`                reductions, arg-reductions, spatial pools
:mod:`~.shape`                  reshape, permute, cat/split, select, index, pad
:mod:`~.recurrent`              LSTM, GRU, RNN
==============================  ==============================================

Users add rules for their own ops with :func:`register_rule`::

    @converters.register_rule("mylib::scaled_tanh")
    def _(ctx, node):
        return ctx.elementwise(node, activation="odd")
"""

from converters.rules import (  # noqa: F401 - importing a family registers its rules
    attention,
    elementwise,
    linear,
    norms,
    pooling,
    recurrent,
    shape,
)
from converters.rules.base import RULES, Context, Rule, default_rule, op_name, register_rule

__all__ = ["Context", "Rule", "register_rule", "RULES", "op_name", "default_rule"]
