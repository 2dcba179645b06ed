"""Update rules whose core is a metanetwork, and the ``torch.optim`` optimizer that runs them.

The rule follows Universal Neural Functionals (Zhou, Finn, Harrison 2024):

.. math::

    W_{t+1} = W_t - \\alpha\\,\\big(m_t + \\beta\\, f(W_t, \\nabla_t, m_t, t)\\big)

with ``m`` the momentum (0.9) of the gradients, ``alpha`` and ``beta`` learned (as
logarithms) and ``f`` an update network over per-parameter features. Every feature is
either elementwise or normalized by a per-tensor statistic, and the time features are
constants, so when ``f`` is permutation-equivariant over the WeightSpace the whole update
is: permuting the network's hidden units permutes its update.

Features, per tensor, ``C = 7 + len(TIMESCALES)`` channels:

* the weight, the gradient and the momenta at ``MOMENTA``, each divided by its RMS over
  the tensor;
* the gradient and the 0.9 momentum divided by the bias-corrected RMS of the gradients
  (Adam's direction, clipped to ``±CLIP``);
* ``tanh(t / tau)`` for every ``tau`` in ``TIMESCALES``.

Update networks map ``{name: (B, C, *shape)}`` to ``{name: (B, *shape)}``:
:class:`PerParameterMLP` (the DeepSet-style baseline: one MLP applied to every parameter
alone), :class:`UNFUpdate` (the same MLP plus a stack of :class:`~metanet.nn.UNFLinear`
layers) and :class:`GMNUpdate` (the same MLP plus a :class:`~metanet.nn.GMN` over the
parameter graph). The UNF and GMN nets run on any WeightSpace whose parameter shapes
match the one they were built for in everything but the permuted sizes, so one learned
optimizer trains networks of every width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from metanet.graph import GraphGather
from metanet.space import Axis, WeightSpace

__all__ = [
    "MOMENTA",
    "TIMESCALES",
    "NUM_FEATURES",
    "features",
    "init_state",
    "PerParameterMLP",
    "UNFUpdate",
    "GMNUpdate",
    "UpdateRule",
    "LearnedOptimizer",
    "permutable_io",
]

MOMENTA = (0.5, 0.9, 0.99)
RMS_DECAY = 0.999
TIMESCALES = (1.0, 10.0, 100.0, 1000.0)
CLIP = 10.0
NUM_FEATURES = 7 + len(TIMESCALES)
_EPS = 1e-8


def init_state(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Zero momenta and second moments for every tensor, and the step count."""
    state: dict[str, Tensor] = {}
    for name, w in weights.items():
        for b in MOMENTA:
            state[f"m{b}/{name}"] = torch.zeros_like(w)
        state[f"v/{name}"] = torch.zeros_like(w)
    first = next(iter(weights.values()))
    state["t"] = torch.zeros((), dtype=first.dtype, device=first.device)
    return state


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().add(1e-12).sqrt()


def advance(
    weights: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The state after seeing ``grads``: momenta and second moments updated, ``t + 1``."""
    new = {"t": state["t"] + 1}
    for name, g in grads.items():
        for b in MOMENTA:
            new[f"m{b}/{name}"] = b * state[f"m{b}/{name}"] + (1 - b) * g
        new[f"v/{name}"] = RMS_DECAY * state[f"v/{name}"] + (1 - RMS_DECAY) * g.square()
    return new


def features(
    weights: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Per-parameter features ``{name: (1, NUM_FEATURES, *shape)}`` from the weights, the
    gradients and the *advanced* state (see the module docstring)."""
    t = state["t"]
    v_corr = 1 - RMS_DECAY**t
    m_corr = 1 - 0.9**t
    out = {}
    for name, w in weights.items():
        g = grads[name]
        ms = [state[f"m{b}/{name}"] for b in MOMENTA]
        denom = (state[f"v/{name}"] / v_corr + _EPS**2).sqrt() + _EPS  # finite slope at 0
        chans = [w / _rms(w), g / _rms(g)] + [m / _rms(m) for m in ms]
        chans += [
            (g / denom).clamp(-CLIP, CLIP),
            (state[f"m0.9/{name}"] / m_corr / denom).clamp(-CLIP, CLIP),
        ]
        chans += [torch.tanh(t / tau).expand_as(w) for tau in TIMESCALES]
        out[name] = torch.stack(chans)[None]
    return out


def _complete(space: WeightSpace, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Features for every tensor of the space: tensors the optimizer does not update
    (BatchNorm statistics, frozen parameters) read as zeros, which every permutation
    leaves alone."""
    first = next(iter(feats.values()))
    out = dict(feats)
    for name, t in space.tensors.items():
        if name not in out:
            out[name] = first.new_zeros(*first.shape[:2], *t.shape)
    return out


def _mlp(sizes: list[int]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    seq = nn.Sequential(*mods[:-1])
    nn.init.zeros_(seq[-1].weight)  # f starts at 0: the rule starts as SGD with momentum
    nn.init.zeros_(seq[-1].bias)
    return seq


class PerParameterMLP(nn.Module):
    """The same small MLP applied to every parameter's features alone (no interaction
    between parameters): the DeepSet-style learned optimizer of the literature."""

    def __init__(self, in_features: int = NUM_FEATURES, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.mlp = _mlp([in_features] + [hidden] * layers + [1])

    def forward(self, space: WeightSpace, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.mlp(v.movedim(1, -1)).squeeze(-1) for k, v in feats.items()}


class _UNFStack(nn.Module):
    def __init__(self, space: WeightSpace, sizes: list[int], basis: str):
        from metanet.nn import UNFLinear

        super().__init__()
        self.layers = nn.ModuleList(
            UNFLinear(space, a, b, basis=basis) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        for i, layer in enumerate(self.layers):
            if i:
                x = {k: torch.relu(v) for k, v in x.items()}
            x = layer(x)
        return x


class _PerSpace(nn.Module):
    """A metanetwork built for one WeightSpace, run on others with the same parameters:
    a copy is built per space (cached) and called with the template's parameters."""

    def __init__(self, space: WeightSpace):
        super().__init__()
        self._spaces: list[tuple[WeightSpace, nn.Module]] = []
        self.space = space

    def _build(self, space: WeightSpace) -> nn.Module:
        raise NotImplementedError

    def _template(self) -> nn.Module:
        raise NotImplementedError

    def _check(self, template: nn.Module, module: nn.Module) -> None:
        mine = dict(template.named_parameters())
        for name, p in module.named_parameters():
            if name not in mine or mine[name].shape != p.shape:
                have = tuple(mine[name].shape) if name in mine else "nothing"
                raise ValueError(
                    f"{type(self).__name__}: built for another WeightSpace; on this one its "
                    f"parameter {name!r} would have shape {tuple(p.shape)}, it has {have} "
                    "(only the sizes of permuted axes may differ: same depth, same fixed "
                    "input/output sizes)"
                )

    def _run(self, space: WeightSpace, *args):
        template = self._template()
        if space is self.space:
            return template(*args)
        module = next((m for s, m in self._spaces if s is space), None)
        if module is None:
            if space == self.space:
                module = template
            else:
                module = next((m for s, m in self._spaces if s == space), None) or self._build(
                    space
                )
                self._check(template, module)
            self._spaces.append((space, module))
        if module is template:
            return template(*args)
        params = dict(template.named_parameters())
        return torch.func.functional_call(module, params, args)


def permutable_io(space: WeightSpace) -> WeightSpace:
    """``space`` with its input and output neurons made permutable too (each fixed input or
    output neuron set a group of its own), as nfn's NP layers assume.

    A UNF layer folds fixed axes into channels and mixes them densely: on the digits MLP
    (64 input pixels) that is 5.4M parameters for a 3-layer UNF of width 16. On this space
    the same layer shares its weights across pixels (the whole UNFUpdate: 29k parameters). Its group contains
    the network's, so maps equivariant on it are equivariant for the network too."""
    from dataclasses import replace

    from metanet.space import Group

    groups = dict(space.groups)
    relabel: dict[str, str] = {}
    sets = {}
    for name, ns in space.neuron_sets.items():
        segs = ns.axis.segments
        if ns.kind in ("input", "output") and len(segs) == 1 and len(segs[0]) == 1:
            f = segs[0][0]
            if f.group is None and f.size > 1:
                g = f"io:{name}"
                groups[g] = Group(g, f.size)
                relabel[name] = g
                ns = replace(ns, axis=Axis.of(g, f.size))
        sets[name] = ns
    tensors = []
    for t in space.tensors.values():
        axes = list(t.axes)
        for set_name, ax in ((t.in_set, t.in_axis), (t.out_set, t.out_axis)):
            if set_name in relabel and ax is not None:
                axes[ax] = Axis.of(relabel[set_name], t.shape[ax])
        tensors.append(replace(t, axes=tuple(axes)))
    return WeightSpace.build(groups.values(), tensors, sets.values(), space.identities, space.notes)


class UNFUpdate(_PerSpace):
    """``f`` = a per-parameter MLP + a stack of UNF layers (``layers`` of width ``hidden``,
    ReLU between, the last one zero-initialized) over the whole weight space.

    ``io="permutable"`` (default) builds the UNF layers on :func:`permutable_io` of the
    space: weights shared across input pixels and output logits, a small network that is
    equivariant to the network's group all the same. ``io="fixed"`` keeps the space's
    fixed axes (a separate map per fixed position: far more parameters)."""

    def __init__(
        self,
        space: WeightSpace,
        in_features: int = NUM_FEATURES,
        hidden: int = 16,
        layers: int = 3,
        mlp_hidden: int = 32,
        basis: str = "full",
        io: str = "permutable",
    ):
        if io not in ("permutable", "fixed"):
            raise ValueError(f"io must be 'permutable' or 'fixed', not {io!r}")
        super().__init__(space)
        self.io = io
        self.pointwise = PerParameterMLP(in_features, mlp_hidden)
        self._sizes, self._basis = [in_features] + [hidden] * (layers - 1) + [1], basis
        self.unf = _UNFStack(self._layer_space(space), self._sizes, basis)
        last = self.unf.layers[-1]
        with torch.no_grad():
            for w in last.weights:
                w.zero_()

    def _layer_space(self, space: WeightSpace) -> WeightSpace:
        return permutable_io(space) if self.io == "permutable" else space

    def _build(self, space):
        return _UNFStack(self._layer_space(space), self._sizes, self._basis)

    def _template(self):
        return self.unf

    def forward(self, space: WeightSpace, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        base = self.pointwise(space, feats)
        unf = self._run(space, _complete(space, feats))
        return {k: base[k] + unf[k][:, 0] for k in base}


class GMNUpdate(nn.Module):
    """``f`` = a per-parameter MLP + an equivariant :class:`~metanet.nn.GMN` over the
    parameter graph (node features: biases and norms; edge features: weights and kernel
    taps; every feature channel side by side). Message passing does not care about sizes,
    so it runs on any space with the same node/edge feature widths. Tensors the graph does
    not hold get the per-parameter part only."""

    def __init__(
        self,
        space: WeightSpace,
        in_features: int = NUM_FEATURES,
        hidden: int = 16,
        layers: int = 2,
        mlp_hidden: int = 32,
    ):
        from metanet.graph import GraphLayout
        from metanet.nn import GMN

        super().__init__()
        layout = GraphLayout.of(space)
        self.node_dim, self.edge_dim = layout.node_dim, layout.edge_dim
        self.pointwise = PerParameterMLP(in_features, mlp_hidden)
        self.gmn = GMN(
            self.node_dim * in_features,
            self.edge_dim * in_features,
            hidden=hidden,
            layers=layers,
            equivariant=True,
            frequencies=2,
        )
        for head in (self.gmn.node_out, self.gmn.edge_out):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        self._gathers: list[tuple[WeightSpace, GraphGather]] = []

    def _gather(self, space: WeightSpace) -> GraphGather:
        found = next((g for s, g in self._gathers if s is space), None)
        if found is None:
            found = next((g for s, g in self._gathers if s == space), None)
        if found is None:
            from metanet.graph import GraphLayout

            layout = GraphLayout.of(space)
            if layout.node_dim > self.node_dim or layout.edge_dim > self.edge_dim:
                raise ValueError(
                    f"GMNUpdate was built for node/edge features of width {self.node_dim}/"
                    f"{self.edge_dim}; this space needs {layout.node_dim}/{layout.edge_dim}"
                )
            found = GraphGather(space, self.node_dim, self.edge_dim)
        self._gathers.append((space, found))
        return found

    def forward(self, space: WeightSpace, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = self.pointwise(space, feats)
        gather = self._gather(space)
        graph = gather.graph(_complete(space, feats))
        c = next(iter(feats.values())).shape[1]
        node, edge = self.gmn(graph)  # channel 0's block is the update
        upd = gather.weights(
            node.view(-1, c, self.node_dim)[:, 0], edge.view(-1, c, self.edge_dim)[:, 0]
        )
        for n, t in space.tensors.items():
            if n in out and (t.is_edge or t.is_node):
                out[n] = out[n] + upd[n].to(out[n].dtype)
        return out


class UpdateRule(nn.Module):
    """``W - alpha (m + beta f(features))`` as a function of the weights, gradients and
    state: the part a :class:`LearnedOptimizer` runs and meta-training differentiates.

    Args:
        net: the update network (``net(space, feats) -> {name: (B, *shape)}``).
        alpha, beta: initial values of the learned step size and of the weight of ``f``.
    """

    def __init__(self, net: nn.Module, alpha: float = 1.0, beta: float = 0.01):
        super().__init__()
        self.net = net
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    @property
    def beta(self) -> float:
        return float(self.log_beta.detach().exp())

    def forward(
        self,
        space: WeightSpace,
        weights: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(new weights, new state)``."""
        state = advance(weights, grads, state)
        feats = features(weights, grads, state)
        dtype = next(iter(weights.values())).dtype
        f = self.net(space, {k: v.to(self._dtype()) for k, v in feats.items()})
        alpha, beta = self.log_alpha.exp().to(dtype), self.log_beta.exp().to(dtype)
        new = {
            k: w - alpha * (state[f"m0.9/{k}"] + beta * f[k][0].to(dtype))
            for k, w in weights.items()
        }
        return new, state

    def _dtype(self) -> torch.dtype:
        return self.log_alpha.dtype


class LearnedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is an :class:`UpdateRule`.

    Args:
        params: ``model.named_parameters()`` (names must be the space's tensor names), or
            parameters in the space's tensor order.
        update_net: an :class:`UpdateRule`, or an update network (wrapped in a fresh rule).
        space: the WeightSpace of the parameters (``converters.from_module(model, ...)``).

    The update network runs without gradients; its own parameters are not trained here
    (see :func:`tasks.optim.learned_opt.meta_train`).
    """

    def __init__(
        self,
        params: Iterable,
        update_net: nn.Module,
        space: WeightSpace | None = None,
    ):
        if space is None:
            raise ValueError("LearnedOptimizer needs the parameters' WeightSpace: space=...")
        items = list(params)
        if items and isinstance(items[0], tuple):
            names, tensors = [n for n, _ in items], [p for _, p in items]
        else:
            names = [n for n, t in space.tensors.items() if t.kind == "parameter"]
            tensors = items
            if len(names) != len(tensors):
                raise ValueError(
                    f"{len(tensors)} parameters given, the WeightSpace has {len(names)}: pass "
                    "model.named_parameters() to match them by name"
                )
        missing = [n for n in names if n not in space.tensors]
        if missing:
            raise ValueError(f"parameter {missing[0]!r} is not a tensor of the WeightSpace")
        for n, p in zip(names, tensors):
            if tuple(p.shape) != space.tensors[n].shape:
                raise ValueError(
                    f"parameter {n!r} has shape {tuple(p.shape)}, the WeightSpace says "
                    f"{space.tensors[n].shape}"
                )
        rule = update_net if isinstance(update_net, UpdateRule) else UpdateRule(update_net)
        super().__init__(tensors, {})
        self.rule, self.space, self.names = rule, space, names
        self._state = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.param_groups[0]["params"]
        weights = {n: p.detach() for n, p in zip(self.names, params)}
        grads = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in zip(self.names, params)
        }
        if self._state is None:
            self._state = init_state(weights)
        new, self._state = self.rule(self.space, weights, grads, self._state)
        for n, p in zip(self.names, params):
            p.copy_(new[n])
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["learned"] = {k: v.clone() for k, v in (self._state or {}).items()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        learned = state_dict.pop("learned", {})
        super().load_state_dict(state_dict)
        self._state = {k: v.clone() for k, v in learned.items()} or None
