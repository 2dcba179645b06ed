"""Recurrent layers (LSTM, GRU, RNN): gate blocks concatenate copies of the hidden
units; stacked final states keep one variable per layer."""

from __future__ import annotations

from typing import Any

from torch import fx

from converters.rules.base import (
    RULES,
    Context,
    Rule,
    default_rule,
    op_name,
)


def _recurrent(gates: int) -> Rule:
    def rule(ctx: Context, node: fx.Node) -> Any:
        x, hx, params = node.args[0], node.args[1], node.args[2]
        has_biases, num_layers, _, _, bidirectional, batch_first = node.args[3:9]
        alg = ctx.alg
        where = f"in {ctx.module_of(node)}"
        hx = hx if isinstance(hx, list | tuple) else [hx]
        per = 4 if has_biases else 2
        dirs = 2 if bidirectional else 1
        if len(params) != num_layers * dirs * per:  # e.g. LSTM with proj_size
            return default_rule(ctx, node, op_name(node.target) + " (projections)")
        dx = list(ctx.dims(x))
        in_var = dx[-1]
        hidden = []
        for layer in range(num_layers):
            outs = []
            for dr in range(dirs):
                p = params[(layer * dirs + dr) * per : (layer * dirs + dr + 1) * per]
                w_ih, w_hh = ctx.dims(p[0]), ctx.dims(p[1])
                h = alg.leaf(ctx.shape(p[1])[1])
                gate = alg.concat([h] * gates, [ctx.shape(p[1])[1]] * gates)
                alg.unify(w_ih[0], gate, where)
                alg.unify(w_hh[0], gate, where)
                alg.unify(w_hh[1], h, where)
                alg.unify(w_ih[1], in_var, where)
                ctx.events.append(("set", node, h))
                ctx.edge(node, x if layer == 0 else node, p[0], 0, 1, in_var, gate)
                ctx.edge(node, node, p[1], 0, 1, h, gate)
                for b in p[2:]:
                    alg.unify(ctx.dims(b)[0], gate, where)
                    ctx.on_set(node, node, b, gate, "bias")
                ctx.mark([h], "other")
                outs.append(h)
            in_var = outs[0] if dirs == 1 else alg.concat(outs, [ctx.shape(params[1])[1]] * 2)
            hidden.append(outs)
        # initial states: constant ones impose nothing; given ones pin the units they feed
        for h0 in hx:
            if any(v is not None for v in ctx.dims(h0) or []):
                if num_layers * dirs == 1:
                    alg.unify(ctx.dims(h0)[-1], hidden[0][0], where)
                else:
                    src = ctx.env.get(("stacked", h0))
                    if (
                        src is not None
                        and len(src) == num_layers * dirs
                        and len(ctx.dims(h0)) in (2, 3)
                    ):
                        for a, b in zip(src, [h for hs in hidden for h in hs]):
                            alg.unify(a, b, where)
                    else:
                        for hs in hidden:
                            for h in hs:
                                alg.fix(h)
                if ctx.env.get(("stacked", h0)) is None:
                    # a learned or given initial state: its own axes are pinned too
                    for v in ctx.dims(h0) or []:
                        alg.fix(v)
        seq_out = dx[:-1] + [in_var]
        layers = [h for hs in hidden for h in hs]
        batch = [dx[0] if batch_first else dx[1]] if len(dx) == 3 else []
        finals = []
        for i in range(len(node.meta["val"]) - 1):
            # (layers, batch, hidden): one hidden variable per layer along axis 0
            last = layers[0] if len(layers) == 1 else alg.leaf(ctx.shape(params[1])[1])
            # the leading axis holds one entry per layer and direction: positions, fixed
            finals.append([alg.fixed(num_layers * dirs)] + batch + [last])
            ctx.stacked[(node, i + 1)] = (layers, last)
        return [seq_out] + finals

    return rule


RULES["aten.lstm"] = _recurrent(4)
RULES["aten.gru"] = _recurrent(3)
RULES["aten.rnn_tanh"] = _recurrent(1)
RULES["aten.rnn_relu"] = _recurrent(1)
