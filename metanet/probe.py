"""Probe features: what each neuron computes on a few fixed inputs, as neuron features.

A metanetwork that reads only weights has to work out from them what a network computes;
running the network itself on ``P`` fixed *probe inputs* and attaching each neuron's
activations to it tells that directly (Kofinas et al. 2024, "Graph Neural Networks for
Learning Equivariant Representations of Neural Networks": +3 points on MNIST INRs). For
an INR the output neuron's probe features are the image at the probe coordinates.

For a neuron set :math:`S` with activations :math:`a_S(x) \\in \\mathbb{R}^{|S|}` the probe
feature tensor is

.. math::

    F_S[i, p] = a_S(x_p)_i, \\qquad F_S \\in \\mathbb{R}^{|S| \\times P},

averaged over spatial positions for convolutional sets (one value per channel). It is
equivariant by construction: a group element :math:`g` that permutes :math:`S` and keeps
the function gives :math:`F_S(g \\cdot \\theta) = g \\cdot F_S(\\theta)`, so the probe
features are just more tensors of the :class:`~metanet.WeightSpace` (axes: the set's axis
and a fixed probe axis) and every metanetwork built from a space takes them unchanged:
UNF layers read them as node tensors, parameter graphs as node feature columns.

Which activation a set gets: the input of a ``Linear``/``Conv`` layer that reads the set
(what the next layer sees, after the nonlinearity), or else the output of the layer that
writes it (output neurons). Sets that no ``Linear``/``Conv`` layer reads or writes, and
the input set (its features are the probes themselves, the same for every network), are
not probed; :func:`probe_features` returns the sets it probed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metanet.space import Axis, TensorSpec, WeightSpace, WeightSpaceError, _dtype_name

__all__ = [
    "PROBE_PREFIX",
    "ProbeEncoder",
    "probe_plan",
    "probe_features",
    "probe_space",
    "with_probes",
]

PROBE_PREFIX = "probe:"
_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _module_of(model: nn.Module, tensor: str) -> tuple[str, nn.Module] | None:
    name = tensor.rsplit(".", 1)[0] if "." in tensor else ""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return (name, mod) if isinstance(mod, (nn.Linear, *_CONV)) else None


def probe_plan(
    model: nn.Module, space: WeightSpace, sets: Sequence[str] | None = None
) -> dict[str, tuple[str, str, int]]:
    """For each neuron set probed: ``(module name, "input" | "output", channel dim)``.

    ``sets=None`` probes every set but the input set that a ``Linear``/``Conv`` layer
    reads or writes; naming a set that cannot be probed is an error.
    """
    wanted = (
        list(sets)
        if sets is not None
        else [s.name for s in space.neuron_sets.values() if s.kind != "input"]
    )
    plan: dict[str, tuple[str, str, int]] = {}
    for s in wanted:
        if s not in space.neuron_sets:
            raise WeightSpaceError(f"probe: no neuron set {s!r} in the space")
        found = None
        for where, key in (("input", "in_set"), ("output", "out_set")):
            for t in space.tensors.values():
                if t.is_edge and getattr(t, key) == s and (m := _module_of(model, t.name)):
                    found = (m[0], where, -1 if isinstance(m[1], nn.Linear) else 1)
                    break
            if found:
                break
        if found is None:
            if sets is not None:
                raise WeightSpaceError(
                    f"probe: neuron set {s!r} is read or written by no Linear/Conv layer of "
                    "the model; leave it out of sets="
                )
            continue
        plan[s] = found
    return plan


def _per_neuron(a: Tensor, dim: int) -> Tensor:
    """``(P, ...)`` activations to ``(n, P)``: the channel axis first, spatial means."""
    a = a.movedim(dim, -1)
    a = a.reshape(a.shape[0], -1, a.shape[-1]).mean(1)
    return a.transpose(0, 1)


def probe_features(
    model: nn.Module,
    space: WeightSpace,
    weights: Mapping[str, Tensor],
    inputs: Tensor,
    *,
    sets: Sequence[str] | None = None,
    chunk: int = 512,
) -> dict[str, Tensor]:
    """Each probed neuron set's activations on ``inputs`` (``(P, *input shape)``).

    ``weights`` is a state dict of ``model`` (the space's tensors; others keep the model's
    own values), or a batch of them (one leading axis on every tensor); the networks run
    ``chunk`` at a time under :func:`torch.func.vmap`. Returns ``{"probe:<set>": (*lead,
    |set|, P)}``, the sets of :func:`probe_plan`. ``model`` runs in its current mode (call
    ``eval()`` for BatchNorm's running statistics).
    """
    plan = probe_plan(model, space, sets)
    names = [k for k in space.tensors if k in weights]  # the rest: the model's own values
    if not names:
        raise WeightSpaceError("probe: weights hold none of the space's tensors")
    lead = weights[names[0]].dim() - len(space.tensors[names[0]].shape)
    if lead not in (0, 1):
        raise WeightSpaceError(f"probe: weights need 0 or 1 leading axes, got {lead}")

    def run(w: dict[str, Tensor]) -> tuple[Tensor, ...]:
        seen: dict[str, Tensor] = {}
        handles = []
        for s, (mod, where, _) in plan.items():

            def hook(_m, args, out, s=s, where=where):
                seen[s] = args[0] if where == "input" else out

            handles.append(model.get_submodule(mod).register_forward_hook(hook))
        try:
            torch.func.functional_call(model, w, (inputs,))
        finally:
            for h in handles:
                h.remove()
        return tuple(_per_neuron(seen[s], plan[s][2]) for s in plan)

    if lead == 0:
        outs = run({k: weights[k] for k in names})
    else:
        n = weights[names[0]].shape[0]
        batched = torch.func.vmap(run)
        parts = [batched({k: weights[k][a : a + chunk] for k in names}) for a in range(0, n, chunk)]
        outs = tuple(torch.cat([p[i] for p in parts]) for i in range(len(plan)))
    return {PROBE_PREFIX + s: o for s, o in zip(plan, outs)}


def probe_space(space: WeightSpace, features: Mapping[str, Tensor]) -> WeightSpace:
    """``space`` with one node tensor per probe feature tensor: ``probe:<set>`` of shape
    ``(|set|, P)``, axes ``(set axis, fixed P)``, sitting on the set (role ``"probe"``)."""
    extra = {}
    for name, f in features.items():
        s = name.removeprefix(PROBE_PREFIX)
        if s not in space.neuron_sets:
            raise WeightSpaceError(f"probe tensor {name!r}: no neuron set {s!r} in the space")
        axis = space.neuron_sets[s].axis
        num = f.shape[-1]
        if f.shape[-2] != axis.size:
            raise WeightSpaceError(
                f"probe tensor {name!r}: {f.shape[-2]} neurons on axis -2, set {s!r} has "
                f"{axis.size}"
            )
        extra[name] = TensorSpec(
            name,
            (axis.size, num),
            (axis, Axis.fixed(num)),
            role="probe",
            kind="probe",
            dtype=_dtype_name(f.dtype),
            out_set=s,
            out_axis=0,
        )
    return space.replace(tensors={**space.tensors, **extra})


def with_probes(
    model: nn.Module,
    space: WeightSpace,
    weights: Mapping[str, Tensor],
    inputs: Tensor,
    **kwargs,
) -> tuple[WeightSpace, dict[str, Tensor]]:
    """``(probe_space, weights + probe features)``: the weights with their probe features
    as extra tensors, and the space that describes them (see :func:`probe_features`)."""
    feats = probe_features(model, space, weights, inputs, **kwargs)
    return probe_space(space, feats), {**weights, **feats}


class ProbeEncoder(nn.Module):
    """Learned encodings of probe features: per neuron, for models that fold fixed axes
    into channels (UNF), and an invariant summary any head can read directly.

    * **Per neuron** (``channels``): ``P`` probe values per neuron are too many channels
      to mix densely (UNF's cost grows with ``P²``), so an MLP shared by all neurons of a
      tensor maps them to ``channels`` first. ``channels=None``: the summary alone.
    * **Summary** (``out_features`` wide): a DeepSets per probe tensor, an MLP ``phi`` on
      each neuron's ``P`` values, then the mean and the max over the tensor's neurons:

      .. math::

          z = \\big[\\operatorname{mean}_i \\phi_S(F_S[i]),\\quad
              \\operatorname{max}_i \\phi_S(F_S[i])\\big]_S

      Neurons of a set no group permutes (a classifier's logits, an INR's output) are
      pooled the same way with ``fixed="pool"``; with ``fixed="flatten"`` their raw probe
      values go to the summary as they are, in order (which logit is which class then
      stays known).

    Both act on the fixed probe axis only, identically for every neuron of a set, so they
    commute with every permutation of the neurons and the summary is invariant.

    ``space`` is a :func:`probe_space`; :attr:`space` is the same space with each probe
    tensor reduced to ``(|set|, 1)`` (what the per-neuron encoder outputs, per channel).
    Shapes: ``forward({name: (B, |set|, P)}) -> ({name: (B, channels, |set|, 1)},
    (B, out_features))`` (an empty dict with ``channels=None``).
    """

    def __init__(
        self,
        space: WeightSpace,
        channels: int | None,
        hidden: int = 64,
        fixed: str = "pool",
    ):
        super().__init__()
        if fixed not in ("pool", "flatten"):
            raise ValueError(f"ProbeEncoder: fixed={fixed!r}, expected 'pool' or 'flatten'")
        self.names = [n for n, t in space.tensors.items() if t.role == "probe"]
        if not self.names:
            raise WeightSpaceError("ProbeEncoder: the space has no probe tensors")
        reduced = dict(space.tensors)
        self.encode, self.summary = nn.ModuleList(), nn.ModuleList()
        self.flat: list[bool] = []
        width = 0
        for n in self.names:
            t = space.tensors[n]
            num = t.shape[1]
            reduced[n] = TensorSpec(
                n,
                (t.shape[0], 1),
                (t.axes[0], Axis.fixed(1)),
                role="probe",
                kind="probe",
                out_set=t.out_set,
                out_axis=0,
            )
            if channels is not None:
                self.encode.append(
                    nn.Sequential(nn.Linear(num, hidden), nn.ReLU(), nn.Linear(hidden, channels))
                )
            flat = fixed == "flatten" and t.axes[0].is_fixed
            self.flat.append(flat)
            self.summary.append(
                nn.Identity()
                if flat
                else nn.Sequential(nn.Linear(num, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            )
            width += t.shape[0] * num if flat else 2 * hidden
        self.channels = channels
        self.space = space.replace(tensors=reduced)
        self.out_features = width

    def forward(self, probes: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        feats, summary = {}, []
        for k, (n, summ) in enumerate(zip(self.names, self.summary)):
            v = probes[n]  # (B, |set|, P)
            if self.channels is not None:
                feats[n] = self.encode[k](v).movedim(-1, 1).unsqueeze(-1)
            if self.flat[k]:
                summary.append(v.flatten(1))
            else:
                h = summ(v)
                summary += [h.mean(1), h.amax(1)]
        return feats, torch.cat(summary, -1)
