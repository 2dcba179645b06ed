"""Symmetry teleportation: move along loss-invariant orbits, then keep optimizing.

Zhao et al., "Symmetry Teleportation for Accelerated Optimization" (NeurIPS 2022) and
"Improving Convergence and Generalization Using Parameter Symmetries" (ICLR 2024): pick a
group element by gradient ascent *on the group* so that the teleported weights compute
the same loss but have a larger gradient (or a different curvature), then go on training.

The group actions come from the :class:`~metanet.WeightSpace`, not from per-model code:

* ``scale`` — positive per-neuron scaling of a group annotated ``positive_scale``
  (ReLU-like activations). Writers of the group's neuron set are multiplied by ``s``
  (or, when a per-channel normalization sits on the set, its scale and shift are), readers
  are divided by ``s``. Exact.
* ``gl`` — an invertible matrix on a group annotated ``gl`` (no nonlinearity): writers
  ``W -> M W``, readers ``W -> W M^-1``. Exact.
* ``norm`` — the scale invariance a normalization creates
  (:attr:`~metanet.WeightSpace.norm_scales`): the tensors before a BatchNorm/LayerNorm
  (one factor per channel, or one per region) are multiplied by ``s`` (running variances
  by ``s²``), nothing is divided. Exact at the norms' ``eps = 0`` (verified there), to
  ``O(eps / var)`` otherwise; the gradient of those tensors scales as ``1/s``, so this
  is the teleport that moves an effective learning rate. Opt in with ``kinds``.
* ``data`` — the data-dependent GL action of the papers for a hidden layer with an
  elementwise activation between two Linear layers: ``W1 -> M W1``,
  ``W2 -> W2 σ(Z) σ(M Z)^+`` with ``Z`` the layer's pre-activations on the teleport batch.
  It preserves the outputs *on that batch* when the batch is no larger than the layer's
  width; elsewhere only approximately. Labelled ``exact=False``.

Every exact action is verified on the network itself (float64, a random element) before
it is used; candidates that fail are dropped and named in :attr:`Actions.notes`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metanet.space import NormScale, WeightSpace

__all__ = [
    "Action",
    "Actions",
    "group_actions",
    "act",
    "teleport",
    "TeleportResult",
    "Teleport",
    "canonicalize_scale",
]

_NORM_ROLES = ("norm_weight", "norm_bias")


@dataclass
class Action:
    """One continuous symmetry: ``kind`` in ``scale``, ``gl``, ``norm``, ``data``.

    ``writers`` / ``readers``: ``(tensor, axis)`` pairs multiplied by ``s``/``M`` and by
    ``1/s``/``M^-1`` (``axis`` None: the whole tensor). For ``data`` actions ``modules``
    holds the (writer, activation, reader) module names; for ``norm`` actions ``norm`` is
    the space's :class:`~metanet.space.NormScale` (its members, with their powers).
    """

    kind: str
    group: str
    size: int
    writers: list[tuple[str, int]]
    readers: list[tuple[str, int]]
    exact: bool = True
    modules: tuple[str, str, str] | None = None
    norm: NormScale | None = None

    def describe(self) -> str:
        label = "exact" if self.exact else "data-dependent"
        return f"{self.kind}({self.group}, n={self.size}, {label})"


@dataclass
class Actions:
    """The continuous symmetries found for a model, and why candidates were dropped."""

    actions: list[Action]
    notes: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def of_kind(self, *kinds: str) -> list[Action]:
        return [a for a in self.actions if a.kind in kinds]


def _simple_axis(space: WeightSpace, name: str, axis: int, group: str) -> bool:
    a = space.tensors[name].axes[axis]
    return len(a.segments) == 1 and len(a.segments[0]) == 1 and a.segments[0][0].group == group


def _candidates(space: WeightSpace, kind: str, group: str) -> Action | None:
    """Writers and readers of every neuron set the group acts on (simple axes only)."""
    sets = [s.name for s in space.neuron_sets.values() if s.axis.groups == (group,)]
    if not sets:
        return None
    writers, readers = [], []
    claimed: set[str] = set()
    for sname in sets:
        on_set = [t for t in space.tensors.values() if t.out_set == sname]
        normed = any(t.role in _NORM_ROLES for t in on_set)
        for t in on_set:
            if t.role in ("running_mean", "running_var") or (normed and t.role not in _NORM_ROLES):
                claimed.add(t.name)  # a per-channel norm absorbs what is written before it
                continue
            writers.append((t.name, t.out_axis))
        for t in space.tensors.values():
            if t.in_set == sname:
                readers.append((t.name, t.in_axis))
    for name, axis in writers + readers:
        if not _simple_axis(space, name, axis, group):
            return None
        claimed.add(name)
    # every tensor the group touches must be a writer or reader: else not this action
    if any(n not in claimed for n in space.tensors_of(group)):
        return None
    if kind == "gl" and any(space.tensors[n].role in _NORM_ROLES for n, _ in writers):
        return None
    return Action(kind, group, space.groups[group].size, writers, readers)


def _scale_along(w: Tensor, axis: int | None, s: Tensor) -> Tensor:
    if axis is None:  # the whole tensor, by the one factor
        return w * s.reshape(()).to(w.dtype)
    shape = [1] * w.dim()
    shape[axis] = -1
    return w * s.reshape(shape).to(w.dtype)


def _matmul_along(w: Tensor, axis: int, m: Tensor) -> Tensor:
    """``w`` with ``m`` applied on ``axis``: ``out[..i..] = sum_j m[i, j] w[..j..]``."""
    moved = w.movedim(axis, 0)
    out = (m.to(w.dtype) @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape)
    return out.movedim(0, axis)


def act(
    weights: Mapping[str, Tensor],
    action: Action,
    param: Tensor,
    batch_pre: Tensor | None = None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Apply one action (differentiable in ``param``).

    ``param``: ``log s`` (shape ``(n,)``) for ``scale`` and ``norm``; the matrix ``M`` (``(n, n)``)
    for ``gl`` and ``data``. ``data`` also needs the pre-activations ``batch_pre``
    (``(batch, n)``) of the teleport batch and the activation function.
    """
    out = dict(weights)
    if action.kind == "scale":
        s = param.exp()
        for name, axis in action.writers:
            out[name] = _scale_along(out[name], axis, s)
        for name, axis in action.readers:
            out[name] = _scale_along(out[name], axis, 1 / s)
        return out
    if action.kind == "norm":
        return action.norm.apply(out, param.exp())
    m = param
    if action.kind == "gl":
        m_inv = torch.linalg.inv(m)
        for name, axis in action.writers:
            out[name] = _matmul_along(out[name], axis, m)
        for name, axis in action.readers:
            out[name] = _matmul_along(out[name], axis, m_inv.T)
        return out
    if action.kind == "data":
        if batch_pre is None or activation is None:
            raise ValueError(f"{action.describe()} needs the batch's pre-activations")
        for name, axis in action.writers:
            out[name] = _matmul_along(out[name], axis, m)
        z = batch_pre.T.to(m.dtype)  # (n, batch)
        old, new = activation(z), activation(m @ z)
        fix = old @ torch.linalg.pinv(new)  # (n, n): reader input correction
        for name, axis in action.readers:
            out[name] = _matmul_along(out[name], axis, fix.T)
        return out
    raise ValueError(f"unknown action kind {action.kind!r}")


# --------------------------------------------------------------------------- discovery
_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Softplus)


def _data_candidates(model: nn.Module, space: WeightSpace) -> list[Action]:
    """Linear -> activation -> Linear runs inside any nn.Sequential."""
    out = []
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        items = list(mod.named_children())
        for (n1, m1), (n2, m2), (n3, m3) in zip(items, items[1:], items[2:]):
            if not (
                isinstance(m1, nn.Linear)
                and isinstance(m2, _ACTIVATIONS)
                and isinstance(m3, nn.Linear)
            ):
                continue
            full = [f"{prefix}.{n}" if prefix else n for n in (n1, n2, n3)]
            w1, w3 = f"{full[0]}.weight", f"{full[2]}.weight"
            if w1 not in space.tensors or w3 not in space.tensors:
                continue
            writers = [(w1, 0)] + ([(f"{full[0]}.bias", 0)] if m1.bias is not None else [])
            group = next(iter(space.tensors[w1].axes[0].groups), None)
            if group is None:
                continue
            out.append(
                Action(
                    "data",
                    group,
                    m1.out_features,
                    writers,
                    [(w3, 1)],
                    exact=False,
                    modules=tuple(full),
                )
            )
    return out


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@torch.no_grad()
def _verify(model, weights, action, inputs, rtol, gen) -> float:
    module = copy.deepcopy(model).double().eval()
    if action.kind == "norm":  # exact at eps = 0: check it there
        for m in module.modules():
            if isinstance(getattr(m, "eps", None), float):
                m.eps = 0.0
    w = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    x = tuple(t.double() if t.is_floating_point() else t for t in _as_tuple(inputs))
    ref = functional_call(module, w, x, tie_weights=False)
    n = action.size
    if action.kind in ("scale", "norm"):
        param = torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    else:
        param = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(
            n, n, generator=gen, dtype=torch.float64
        ) / math.sqrt(n)
    got = functional_call(module, act(w, action, param), x, tie_weights=False)
    ref, got = _as_tuple(ref)[0], _as_tuple(got)[0]
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-30))


def group_actions(
    model: nn.Module,
    space: WeightSpace,
    inputs,
    kinds: Sequence[str] = ("scale", "gl"),
    rtol: float = 1e-9,
    seed: int = 0,
) -> Actions:
    """The continuous symmetries of ``model`` that teleportation can use.

    Exact candidates (``scale``, ``gl``) come from the groups' annotations, ``norm`` ones
    (opt in) from the space's norm scales; all are verified on ``inputs`` in float64
    (``norm`` at eps = 0); failures are dropped and noted. ``data`` actions
    (opt in: ``kinds=("scale", "gl", "data")``) are found in ``nn.Sequential`` Linear →
    activation → Linear runs and are labelled data-dependent: exact on a teleport batch no
    larger than the layer's width, checked on that batch by :func:`teleport`.
    """
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    found: list[Action] = []
    notes: list[str] = []
    wanted = {"positive_scale": "scale", "gl": "gl"}
    for g in space.groups.values():
        kind = wanted.get(g.action or "")
        if kind not in kinds or g.within is not None:
            continue
        cand = _candidates(space, kind, g.name)
        if cand is None:
            notes.append(f"{g.name}: {kind} action not expressible on simple axes; skipped")
            continue
        err = _verify(model, weights, cand, inputs, rtol, gen)
        if err <= rtol:
            found.append(cand)
        else:
            notes.append(f"{g.name}: {kind} action changed the output (rel. {err:.1e}); dropped")
    if "norm" in kinds:
        for ns in space.norm_scales:
            writers = [(t, a) for t, a, p in ns.members if p == 1]
            cand = Action("norm", ns.name, ns.size, writers, [], norm=ns)
            err = _verify(model, weights, cand, inputs, rtol, gen)
            if err <= rtol:
                found.append(cand)
            else:
                notes.append(f"{ns.name}: norm action changed the output (rel. {err:.1e}); dropped")
    if "data" in kinds:
        exact_groups = {a.group for a in found if a.kind == "gl"}
        found += [a for a in _data_candidates(model, space) if a.group not in exact_groups]
    return Actions(found, notes)


# --------------------------------------------------------------------------- teleport
@dataclass
class TeleportResult:
    """What a teleport did. ``weights`` are the teleported weights (or the originals when
    ``accepted`` is False)."""

    weights: dict[str, Tensor]
    loss_before: float
    loss_after: float
    objective_before: float
    objective_after: float
    accepted: bool
    reason: str = ""
    params: dict[str, Tensor] = field(default_factory=dict)

    def __str__(self) -> str:
        state = "accepted" if self.accepted else f"rejected ({self.reason})"
        return (
            f"teleport {state}: loss {self.loss_before:.6g} -> {self.loss_after:.6g}, "
            f"objective {self.objective_before:.6g} -> {self.objective_after:.6g}"
        )


def _pre_activations(model, weights, x, writer: str) -> Tensor:
    captured = {}
    mod = dict(model.named_modules())[writer]
    h = mod.register_forward_hook(lambda _m, _i, out: captured.setdefault("z", out))
    try:
        functional_call(model, weights, _as_tuple(x), tie_weights=False)
    finally:
        h.remove()
    z = captured["z"]
    return z.reshape(-1, z.shape[-1])


def _activation_fn(model, name: str) -> Callable[[Tensor], Tensor]:
    return dict(model.named_modules())[name]


def _transformed(model, actions, weights, params, x):
    w = dict(weights)
    for a in actions:
        p = params[a.group + ":" + a.kind]
        if a.kind == "data":
            z = _pre_activations(model, w, x, a.modules[0])
            w = act(w, a, p, z.detach(), _activation_fn(model, a.modules[1]))
        else:
            w = act(w, a, p)
    return w


def _top_eigen(grads, ws, probe: dict, iters: int) -> Tensor:
    """The largest Hessian eigenvalue, by Lanczos (``iters`` Hessian-vector products, full
    reorthogonalization) started from the previous call's Ritz vector kept in ``probe``.
    The returned Rayleigh quotient ``vᵀHv`` is differentiable in the weights with ``v``
    held fixed, which is the eigenvalue's derivative (Hellmann–Feynman)."""
    sizes = [g.numel() for g in grads]

    def split(v: Tensor) -> list[Tensor]:
        return [p.view_as(g) for p, g in zip(v.split(sizes), grads)]

    def hvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grads, ws, split(v), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    q = probe.get("v")
    if q is None or q.numel() != sum(sizes):
        gen = torch.Generator().manual_seed(probe.get("seed", 0))
        q = torch.randn(sum(sizes), generator=gen).to(grads[0].dtype)
    basis = [q / q.norm().clamp_min(1e-30)]
    alpha: list[Tensor] = []
    beta: list[Tensor] = []
    for j in range(min(iters, sum(sizes))):
        z = hvp(basis[j])
        alpha.append(z @ basis[j])
        qs = torch.stack(basis)
        z = z - qs.T @ (qs @ z)  # full reorthogonalization (twice is enough)
        z = z - qs.T @ (qs @ z)
        nz = z.norm()
        if j == iters - 1 or nz <= 1e-10 * alpha[0].abs().clamp_min(1e-30):
            break
        beta.append(nz)
        basis.append(z / nz)
    k = len(alpha)
    t = torch.diag(torch.stack(alpha))
    if k > 1:
        off = torch.stack(beta[: k - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    _, vecs = torch.linalg.eigh(t)
    v = torch.stack(basis[:k]).T @ vecs[:, -1]
    v = v / v.norm().clamp_min(1e-30)
    probe["v"] = v
    hv = torch.autograd.grad(grads, ws, split(v), create_graph=True)
    return sum((h * p).sum() for h, p in zip(hv, split(v)))


def _objective(model, names, w, x, y, loss_fn, objective, probe):
    loss = loss_fn(functional_call(model, w, _as_tuple(x), tie_weights=False), y)
    ws = [w[n] for n in names]
    grads = torch.autograd.grad(loss, ws, create_graph=True)
    if callable(objective):
        return loss, objective(loss, dict(zip(names, grads)))
    gnorm2 = sum((g * g).sum() for g in grads)
    if objective == "grad_norm":
        return loss, gnorm2
    if objective == "sharpness":
        # the largest Hessian eigenvalue, warm-started across the ascent; maximize its
        # negative -> flatter
        return loss, -_top_eigen(grads, ws, probe, iters=probe.get("iters", 10))
    if objective == "curvature":
        gd = [g.detach() for g in grads]
        hv = torch.autograd.grad(grads, ws, gd, create_graph=True)
        return loss, sum((h * g).sum() for h, g in zip(hv, gd)) / gnorm2.detach().clamp_min(1e-30)
    raise ValueError(
        f"objective must be grad_norm, curvature, sharpness or a callable, got {objective!r}"
    )


def teleport(
    model: nn.Module,
    space: WeightSpace,
    batch: tuple,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    objective: str | Callable = "grad_norm",
    steps: int = 10,
    lr: float = 0.1,
    actions: Actions | Iterable[Action] | None = None,
    weights: Mapping[str, Tensor] | None = None,
    loss_rtol: float = 1e-4,
    max_ratio: float | None = None,
    seed: int = 0,
) -> TeleportResult:
    """Teleport ``model``'s weights (or ``weights``) along its symmetry group.

    Gradient ascent (Adam, ``steps`` × ``lr``) on the group parameters to increase the
    objective on ``batch = (inputs, targets)``: ``grad_norm`` (squared gradient norm,
    faster descent), ``curvature`` (gradient-direction curvature ``gᵀHg/|g|²``),
    ``sharpness`` (minimizes the largest Hessian eigenvalue, found by Lanczos on
    the batch: flatter, so a learning rate near the stability edge ``2/λ`` stays stable), or
    a callable ``(loss, grads) -> scalar`` to maximize. ``max_ratio`` stops the ascent once
    a positive objective has grown by that factor (an unbounded gradient norm makes a fixed
    learning rate unstable). Adam moves every group coordinate by about ``lr`` per step,
    whatever its gradient: near a learning rate's stability edge keep ``lr`` small (0.01),
    since a neuron scaled down by ``s`` sees its effective learning rate grow by
    ``1/s²``. The result is accepted only if
    the loss on the batch is unchanged within ``loss_rtol`` (relative) and the objective
    increased; otherwise the original weights come back with the reason. The loss check
    is ``|Δloss| <= loss_rtol * max(1, |loss|)``: relative for losses above 1, absolute
    below.
    """
    if actions is None:
        actions = group_actions(model, space, batch[0])
    actions = list(actions)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    module = copy.deepcopy(model).eval() if bns else model
    stats: set[str] = set()
    if bns and any(a.kind == "norm" for a in actions):
        # running statistics scale with a norm action, and BatchNorm is not differentiable
        # in them: the objective and the loss check use batch statistics (the training-time
        # function) and the statistics are only carried along
        for name in bns:
            bn = module.get_submodule(name)
            bn.running_mean = bn.running_var = None
            bn.track_running_stats = False
            stats |= {f"{name}.running_mean", f"{name}.running_var", f"{name}.num_batches_tracked"}

    def seen(w: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in w.items() if k not in stats}

    base = {k: v.detach() for k, v in (weights or model.state_dict()).items()}
    x, y = batch
    names = [n for n, p in model.named_parameters() if n in base]
    params = {}
    for a in actions:
        diagonal = a.kind in ("scale", "norm")
        shape = (a.size,) if diagonal else (a.size, a.size)
        init = torch.zeros(shape) if diagonal else torch.eye(a.size)
        params[a.group + ":" + a.kind] = init.to(base[a.writers[0][0]].dtype).requires_grad_()

    def evaluate():
        w = _transformed(module, actions, base, params, x)
        w = {
            k: (v if k not in names else v if v.requires_grad else v.requires_grad_())
            for k, v in w.items()
        }
        return _objective(module, names, seen(w), x, y, loss_fn, objective, probe)

    # sharpness: the Lanczos Ritz vector, kept between calls; converged estimates for the
    # values reported before and after, cheaper warm-started ones during the ascent
    probe = {"seed": seed, "iters": 30}
    start = {k: (v.clone().requires_grad_() if k in names else v) for k, v in base.items()}
    loss0, obj0 = (
        float(v.detach())
        for v in _objective(module, names, seen(start), x, y, loss_fn, objective, probe)
    )
    probe["iters"] = 10
    if not actions:
        return TeleportResult(dict(base), loss0, loss0, obj0, obj0, False, "no symmetry found")
    if not (math.isfinite(loss0) and math.isfinite(obj0)):
        return TeleportResult(
            dict(base), loss0, loss0, obj0, obj0, False,
            f"non-finite loss ({loss0:g}) or objective ({obj0:g}) before teleporting",
        )  # fmt: skip
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    kept = {k: v.detach().clone() for k, v in params.items()}
    for i in range(steps + 1):
        last = i == steps
        if last and max_ratio is None:
            kept = {k: v.detach().clone() for k, v in params.items()}
            break
        try:
            _, obj = evaluate()
        except torch.linalg.LinAlgError:
            break  # a data-dependent correction no longer invertible: keep the last point
        if not math.isfinite(float(obj.detach())):
            break  # the ascent left the finite region: keep the last finite point
        if max_ratio is not None and obj0 > 0 and float(obj.detach()) > max_ratio * obj0:
            break  # the last parameters within the bound are kept
        kept = {k: v.detach().clone() for k, v in params.items()}
        if last:
            break
        opt.zero_grad()
        (-obj).backward()
        opt.step()
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(kept[k])
    with torch.no_grad():
        final = _transformed(module, actions, base, params, x)
    final = {k: v.detach() for k, v in final.items()}
    probe["iters"] = 30  # the reported value: a converged estimate
    loss1, obj1 = (
        float(v.detach())
        for v in _objective(
            module,
            names,
            seen({k: (v.clone().requires_grad_() if k in names else v) for k, v in final.items()}),
            x,
            y,
            loss_fn,
            objective,
            probe,
        )
    )
    result = TeleportResult(
        final, loss0, loss1, obj0, obj1, True, params={k: v.detach() for k, v in params.items()}
    )
    if not (math.isfinite(loss1) and math.isfinite(obj1)):
        result.weights, result.accepted = dict(base), False
        result.reason = f"non-finite loss ({loss1:g}) or objective ({obj1:g}) after teleporting"
    elif not abs(loss1 - loss0) <= loss_rtol * max(1.0, abs(loss0)):
        result.weights, result.accepted = dict(base), False
        result.reason = f"loss moved by {abs(loss1 - loss0):.2e}"
    elif not obj1 > obj0:
        result.weights, result.accepted = dict(base), False
        result.reason = "objective did not increase"
    return result


# --------------------------------------------------------------------------- canonical form
@torch.no_grad()
def canonicalize_scale(
    weights: Mapping[str, Tensor], space: WeightSpace, actions: Actions | Iterable[Action]
) -> dict[str, Tensor]:
    """Scale canonical form: every neuron of a ``scale`` group gets unit incoming norm.

    The incoming weights of a neuron are its rows in the group's writers (bias included);
    dividing them by their norm and multiplying the readers back preserves the function.
    Groups are processed in the space's order, so later groups see earlier rescalings.
    Two checkpoints that differ by positive scaling map to the same canonical weights.
    """
    w = dict(weights)
    for a in actions:
        if a.kind != "scale":
            continue
        sq = torch.zeros(a.size, dtype=torch.float64)
        for name, axis in a.writers:
            t = w[name].movedim(axis, 0).reshape(a.size, -1).double()
            sq += (t * t).sum(1)
        log_s = -0.5 * sq.clamp_min(1e-30).log()
        w = act(w, a, log_s)
    return w


# --------------------------------------------------------------------------- wrapper
_GRAD_LIKE = ("momentum_buffer", "exp_avg")
_SQUARED = ("exp_avg_sq", "square_avg", "sum", "max_exp_avg_sq")


class Teleport:
    """Wrap any ``torch.optim`` optimizer: teleport every ``every`` steps.

    ``step(batch)`` runs the optimizer's step, and on every ``every``-th call teleports
    the model's weights on ``batch``. Optimizer state follows the teleport: under a
    scaling ``W -> s W`` gradients transform as ``1/s``, so momentum/first moments are
    divided by ``s`` and second moments by ``s²`` (SGD momentum, Adam, AdaGrad, RMSprop);
    GL and data-dependent teleports reset the state of the tensors they touch
    (``state="reset"`` resets it always). ``log`` lists every teleport.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        space: WeightSpace,
        *,
        every: int = 10,
        actions: Actions | None = None,
        example_inputs=None,
        state: str = "transform",
        **teleport_kw,
    ):
        if state not in ("transform", "reset"):
            raise ValueError(f"state must be 'transform' or 'reset', got {state!r}")
        self.optimizer, self.model, self.space = optimizer, model, space
        self.every, self.state_mode, self.kw = every, state, teleport_kw
        self.actions = actions
        self.example_inputs = example_inputs
        self.steps = 0
        self.log: list[dict] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, batch: tuple | None = None, closure=None):
        out = self.optimizer.step(closure)
        self.steps += 1
        if batch is not None and self.every and self.steps % self.every == 0:
            self.teleport(batch)
        return out

    def teleport(self, batch: tuple) -> TeleportResult:
        if self.actions is None:
            self.actions = group_actions(
                self.model,
                self.space,
                self.example_inputs if self.example_inputs is not None else batch[0],
            )
        result = teleport(self.model, self.space, batch, actions=self.actions, **self.kw)
        if result.accepted:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(result.weights[name])
                for name, buf in self.model.named_buffers():
                    if name in result.weights:
                        buf.copy_(result.weights[name])
            self._move_state(result, params)
        self.log.append(
            {
                "step": self.steps,
                "accepted": result.accepted,
                "reason": result.reason,
                "loss_before": result.loss_before,
                "loss_after": result.loss_after,
                "objective_before": result.objective_before,
                "objective_after": result.objective_after,
            }
        )
        return result

    def _move_state(self, result: TeleportResult, params: dict[str, Tensor]) -> None:
        by_param = {id(p): n for n, p in params.items()}
        touched_reset = set()
        scales: dict[str, list[tuple[int, Tensor, int]]] = {}
        for a in self.actions:
            p = result.params[a.group + ":" + a.kind]
            if a.kind not in ("scale", "norm") or self.state_mode == "reset":
                touched_reset.update(n for n, _ in a.writers + a.readers)
                continue
            s = p.exp()
            for n, axis in a.writers:
                scales.setdefault(n, []).append((axis, s, 1))
            for n, axis in a.readers:
                scales.setdefault(n, []).append((axis, s, -1))
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = by_param.get(id(p))
                st = self.optimizer.state.get(p)
                if name is None or not st:
                    continue
                if name in touched_reset:
                    self.optimizer.state[p] = {}
                    continue
                for axis, s, e in scales.get(name, []):
                    for key, val in st.items():
                        if not isinstance(val, Tensor) or val.shape != p.shape:
                            continue
                        if key in _GRAD_LIKE:
                            st[key] = _scale_along(val, axis, s ** (-e))
                        elif key in _SQUARED:
                            st[key] = _scale_along(val, axis, s ** (-2 * e))
