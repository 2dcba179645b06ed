"""Meta-training learned optimizers, and training networks with any optimizer.

:func:`meta_train` trains an :class:`~tasks.optim.learned_opt.UpdateRule` on a task family with
truncated unrolls: ``tasks`` inner networks (slots) are trained side by side, each for
``horizon`` steps (then replaced by a fresh task; the first runs are staggered), and
every meta-step advances each slot by ``unroll`` steps. The meta-loss is the mean log training loss over the unroll
(``objective="log"``; so late, low-loss phases of training count as much as the first
steps) or the mean training loss (``"mean"``). Its
gradient comes from

* ``"tbptt"`` — truncated backpropagation through the unroll, through the gradients the
  rule reads too (``second_order=False``: they count as inputs, cheaper, biased);
* ``"es"`` — antithetic evolution strategies: ``pairs`` perturbations ``±sigma·eps`` of
  the rule's parameters, each run from the slot's state;
* ``"pes"`` — persistent evolution strategies (Vicol et al., 2021): every particle keeps its
  own inner state across truncations and the perturbations accumulate, which removes the
  truncation bias.

Checkpoints (``checkpoint=PATH``, every ``every`` meta-steps and at the end) hold the
rule, the meta-optimizer, the inner states and the random streams, written atomically
with :func:`metanet.save`; ``meta_train(..., checkpoint=PATH)`` resumes from it, and a run
interrupted and resumed ends where an uninterrupted one does.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from metanet.io import CheckpointError, load, save
from metanet.space import Axis, TensorSpec, WeightSpace
from tasks.optim.learned_opt.families import Family, Task
from tasks.optim.learned_opt.families import family as get_family
from tasks.optim.learned_opt.rule import LearnedOptimizer, UpdateRule, init_state

__all__ = ["MetaResult", "meta_train", "unroll", "train_curve", "tune_lr"]


@dataclass
class MetaResult:
    """What meta-training did: ``history`` has one row per meta-step."""

    steps: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def unroll(
    rule: UpdateRule,
    task: Task,
    weights: dict[str, Tensor],
    state: dict[str, Tensor],
    start: int,
    steps: int,
    differentiable: bool = False,
    objective: str = "mean",
    second_order: bool = False,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Train ``task`` for ``steps`` steps with ``rule`` from step ``start``:
    ``(meta-loss, weights, state)``, the meta-loss being the mean training loss over the
    steps after each update (``objective="log"``: the mean of its logarithm).

    With ``differentiable=True`` the result keeps the graph back to the rule's parameters;
    ``second_order=True`` also differentiates through the gradients the rule reads (how a
    change of the weights changes the next gradient), else they count as inputs.
    """
    second_order = second_order and differentiable
    losses = []
    for k in range(steps):
        w = (
            weights
            if differentiable and k
            else {n: v.detach().requires_grad_() for n, v in weights.items()}
        )
        with torch.enable_grad():
            loss = task.loss(w, task.batch(start + k))
            grads = torch.autograd.grad(
                loss, list(w.values()), retain_graph=differentiable, create_graph=second_order
            )
        if k:
            losses.append(loss)
        g = {n: gi if second_order else gi.detach() for n, gi in zip(w, grads)}
        if differentiable:
            weights, state = rule(task.space, w, g, state)
        else:
            with torch.no_grad():
                weights, state = rule(task.space, {n: v.detach() for n, v in w.items()}, g, state)
    losses.append(task.loss(weights, task.batch(start + steps)))
    stacked = torch.stack(losses)
    if objective == "log":
        stacked = stacked.clamp_min(1e-12).log()
    return stacked.mean(), weights, state


@dataclass
class _Slot:
    seed: int
    width: int
    step: int
    weights: dict[str, Tensor]
    state: dict[str, Tensor]
    task: Task | None = None
    end: int | None = None  # this episode's last step (None: the horizon)

    def get_task(self, fam: Family) -> Task:
        if self.task is None:  # on the device of the slot's weights
            device = next(iter(self.weights.values())).device if self.weights else None
            self.task = fam.task(self.seed, self.width, device)
        return self.task


def _clone(s: _Slot) -> _Slot:
    """A copy of the slot's inner state (the task itself is shared)."""
    return _Slot(
        s.seed, s.width, s.step, {k: v.clone() for k, v in s.weights.items()},
        {k: v.clone() for k, v in s.state.items()}, s.task, s.end,
    )  # fmt: skip


def _new_slot(fam: Family, rng: random.Random, device=None) -> _Slot:
    task = fam.sample(rng, device)
    w = task.init()
    return _Slot(task.seed, task.width, 0, w, init_state(w), task)


def _flat_params(rule: UpdateRule) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in rule.parameters()])


def _as_params(rule: UpdateRule, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in rule.named_parameters():
        out[name] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def meta_train(
    rule: UpdateRule,
    fam: Family | str,
    *,
    steps: int = 200,
    method: str = "tbptt",
    unroll_steps: int = 20,
    horizon: int = 100,
    tasks: int = 2,
    lr: float = 1e-3,
    sigma: float = 0.01,
    pairs: int = 4,
    clip: float = 1.0,
    objective: str = "log",
    second_order: bool = True,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    every: int = 10,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    device: str | torch.device | None = None,
) -> MetaResult:
    """Meta-train ``rule`` in place on task family ``fam`` (see the module docstring).

    Returns a :class:`MetaResult`; with ``checkpoint``, resumes from the file when it
    exists (the settings must match) and writes it every ``every`` meta-steps.
    ``device``: where the rule, the inner tasks and their weights live (batches and ES
    noise are drawn on the CPU, so a run draws the same ones on every device); the host
    reads one loss per task and meta-step.
    """
    if device is not None:
        rule.to(device)
    device = next(rule.parameters()).device
    if method not in ("tbptt", "es", "pes"):
        raise ValueError(f"method must be 'tbptt', 'es' or 'pes', not {method!r}")
    fam = get_family(fam) if isinstance(fam, str) else fam
    config = dict(
        family=fam.name, method=method, unroll=unroll_steps, horizon=horizon, tasks=tasks,
        lr=lr, sigma=sigma, pairs=pairs, clip=clip, seed=seed, objective=objective,
        second_order=second_order,
    )  # fmt: skip
    opt = torch.optim.Adam(rule.parameters(), lr=lr)
    rng = random.Random(seed)
    noise = torch.Generator().manual_seed(seed)
    n_slots = tasks if method == "tbptt" else pairs
    result = MetaResult(steps)
    slots: list[list[_Slot]] = []
    xi: list[Tensor] = []
    if checkpoint is not None and Path(checkpoint).exists():
        slots, xi = _load(checkpoint, rule, opt, rng, noise, config, result, fam, device)
    if not slots:
        for i in range(n_slots):
            s = _new_slot(fam, rng, device)
            # staggered: slot i's first episode is shorter, so the slots sit at different
            # points of their runs and every meta-step sees early and late training alike
            s.end = max(min(unroll_steps, horizon), horizon - i * horizon // n_slots)
            slots.append([s] if method != "pes" else [s, _clone(s)])
        xi = (
            [torch.zeros_like(_flat_params(rule)) for _ in range(n_slots)]
            if method == "pes"
            else []
        )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps, initial=result.resumed_from, desc=f"meta-train {method}", unit="step"
        )
    for it in range(result.resumed_from, steps):
        if method == "tbptt":
            meta_loss = _tbptt_step(
                rule, opt, slots, fam, rng, unroll_steps, horizon, clip, objective, second_order
            )
        else:
            meta_loss = _es_step(
                rule,
                opt,
                slots,
                xi,
                fam,
                rng,
                noise,
                unroll_steps,
                horizon,
                sigma,
                clip,
                method,
                objective,
            )
        row = {"step": it + 1, "meta_loss": meta_loss, "alpha": rule.alpha, "beta": rule.beta}
        result.history.append(row)
        if log is not None:
            log(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(meta_loss=f"{meta_loss:.4f}")
        if checkpoint is not None and ((it + 1) % every == 0 or it + 1 == steps):
            _save(checkpoint, rule, opt, rng, noise, config, result, slots, xi)
    if bar is not None:
        bar.close()
    return result


def _advance_slot(slot: _Slot, fam: Family, rng: random.Random, k: int, horizon: int) -> bool:
    """Move the slot's step on by ``k``; at the horizon, a fresh task (returns True)."""
    slot.step += k
    if slot.step >= (slot.end or horizon):
        device = next(iter(slot.weights.values())).device if slot.weights else None
        fresh = _new_slot(fam, rng, device)
        slot.__dict__.update(fresh.__dict__)
        return True
    return False


def _clip_(params, clip: float) -> None:
    if clip:
        torch.nn.utils.clip_grad_norm_(list(params), clip)


def _tbptt_step(rule, opt, slots, fam, rng, k, horizon, clip, objective, second_order) -> float:
    opt.zero_grad()
    total = 0.0
    for (slot,) in slots:
        task = slot.get_task(fam)
        k_here = min(k, (slot.end or horizon) - slot.step)
        loss, w, st = unroll(
            rule, task, slot.weights, slot.state, slot.step, k_here, True, objective, second_order
        )
        if not torch.isfinite(loss):
            # the inner run diverged: no meta-gradient from it, and a fresh task
            _advance_slot(slot, fam, rng, horizon, horizon)
            total = float("inf")
            continue
        (loss / len(slots)).backward()
        total += float(loss.detach()) / len(slots)
        slot.weights = {n: v.detach() for n, v in w.items()}
        slot.state = {n: v.detach() for n, v in st.items()}
        _advance_slot(slot, fam, rng, k_here, horizon)
    if all(p.grad is None or torch.isfinite(p.grad).all() for p in rule.parameters()):
        _clip_(rule.parameters(), clip)
        opt.step()
    return total


@torch.no_grad()
def _es_step(
    rule, opt, slots, xi, fam, rng, noise, k, horizon, sigma, clip, method, objective
) -> float:
    theta = _flat_params(rule)
    grad = torch.zeros_like(theta)
    total = 0.0
    for i, pair in enumerate(slots):
        eps = torch.randn(theta.shape, generator=noise, dtype=theta.dtype).to(theta.device)
        slot = pair[0]
        task = slot.get_task(fam)
        k_here = min(k, (slot.end or horizon) - slot.step)
        losses, ends = [], []
        for j, sign in enumerate((1.0, -1.0)):
            src = pair[j] if method == "pes" else slot
            params = {
                f"rule.{n}": v for n, v in _as_params(rule, theta + sign * sigma * eps).items()
            }
            loss, w, st = torch.func.functional_call(
                _Unroller(rule),
                params,
                (task, src.weights, src.state, src.step, k_here, False, objective),
            )
            losses.append(float(loss))
            ends.append((w, st))
        if method == "pes":
            xi[i] += eps
            direction = xi[i]
            for j in range(2):
                pair[j].weights, pair[j].state = ends[j]
        else:
            direction = eps
            slot.weights, slot.state = ends[0]
        diff = losses[0] - losses[1]
        if not math.isfinite(diff):
            # a particle diverged: no estimate from this pair, and a fresh task for it
            _advance_slot(pair[0], fam, rng, horizon, horizon)
            for j in range(1, len(pair)):
                pair[j].__dict__.update(_clone(pair[0]).__dict__)
            if method == "pes":
                xi[i].zero_()
            total = float("inf")
            continue
        grad += direction * (diff / (2 * sigma * len(slots)))
        total += (losses[0] + losses[1]) / (2 * len(slots))
        if method == "pes":
            pair[1].step = pair[0].step
            reset = _advance_slot(pair[0], fam, rng, k_here, horizon)
            if reset:
                pair[1].__dict__.update(_clone(pair[0]).__dict__)
                xi[i].zero_()
            else:
                pair[1].step = pair[0].step
        else:
            _advance_slot(slot, fam, rng, k_here, horizon)
    opt.zero_grad()
    for p, g in zip(rule.parameters(), _as_params(rule, grad).values()):
        p.grad = g.clone()
    _clip_(rule.parameters(), clip)
    opt.step()
    return total


class _Unroller(torch.nn.Module):
    """:func:`unroll` as a module, so ``functional_call`` can swap the rule's parameters."""

    def __init__(self, rule: UpdateRule):
        super().__init__()
        self.rule = rule

    def forward(self, task, weights, state, start, steps, differentiable, objective):
        return unroll(self.rule, task, weights, state, start, steps, differentiable, objective)


# --- checkpoints -------------------------------------------------------------------------


def _fixed_space(tensors: dict[str, Tensor]) -> WeightSpace:
    """A WeightSpace with no symmetry at all (a learned optimizer's own parameters and
    meta-training state are stored, not permuted)."""
    specs = [
        TensorSpec(
            n,
            tuple(t.shape),
            tuple(Axis.fixed(s) for s in t.shape),
            role="other",
            dtype=str(t.dtype).replace("torch.", ""),
        )  # fmt: skip
        for n, t in tensors.items()
    ]
    return WeightSpace.build([], specs)


def _save(path, rule, opt, rng, noise, config, result, slots, xi) -> None:
    tensors: dict[str, Tensor] = {}
    for n, p in rule.state_dict().items():
        tensors[f"rule/{n}"] = p
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{idx}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    slot_meta = []
    for i, pair in enumerate(slots):
        rows = []
        for j, s in enumerate(pair):
            for n, v in s.weights.items():
                tensors[f"slot/{i}/{j}/w/{n}"] = v
            for n, v in s.state.items():
                tensors[f"slot/{i}/{j}/s/{n}"] = v
            rows.append({"seed": s.seed, "width": s.width, "step": s.step, "end": s.end})
        slot_meta.append(rows)
    for i, x in enumerate(xi):
        tensors[f"xi/{i}"] = x
    tensors["noise"] = noise.get_state()
    meta = {
        "metanet.learned_opt": json.dumps(
            {
                "config": config,
                "done": len(result.history) + 0,
                "history": result.history,
                "slots": slot_meta,
                "rng": _rng_to_json(rng.getstate()),
                "param_groups": osd["param_groups"],
                "opt_state_keys": sorted(osd["state"]),
            }
        )
    }
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save(path, tensors, _fixed_space(tensors), metadata=meta)


def _rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _load(path, rule, opt, rng, noise, config, result, fam, device=None):
    try:
        tensors, _ = load(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["metanet.learned_opt"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a learned-optimizer checkpoint ({e})") from None
    if meta["config"] != config:
        diff = [k for k in config if meta["config"].get(k) != config[k]]
        raise CheckpointError(
            f"{path}: written with other settings ({', '.join(diff)}: "
            + ", ".join(f"{meta['config'].get(k)!r} there, {config[k]!r} here" for k in diff)
            + "); use another checkpoint path or the same settings"
        )
    rule.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("rule/")})
    state = {}
    for idx in meta["opt_state_keys"]:
        prefix = f"opt/{idx}/"
        state[int(idx)] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    version, internal, gauss = meta["rng"]
    rng.setstate((version, tuple(internal), gauss))
    noise.set_state(tensors["noise"])
    if device is not None:  # the rule's device: slots, ES perturbations (the noise state stays)
        tensors = {k: v if k == "noise" else v.to(device) for k, v in tensors.items()}
    slots = []
    for i, rows in enumerate(meta["slots"]):
        pair = []
        for j, r in enumerate(rows):
            w = {
                k.split("/", 4)[4]: v
                for k, v in tensors.items()
                if k.startswith(f"slot/{i}/{j}/w/")
            }
            s = {
                k.split("/", 4)[4]: v
                for k, v in tensors.items()
                if k.startswith(f"slot/{i}/{j}/s/")
            }
            task = fam.task(r["seed"], r["width"], device)
            w = {n: w[n] for n in task.space.tensors if n in w}
            pair.append(_Slot(r["seed"], r["width"], r["step"], w, s, task, r.get("end")))
        slots.append(pair)
    xi = [tensors[f"xi/{i}"] for i in range(len(slots)) if f"xi/{i}" in tensors]
    result.history = meta["history"]
    result.resumed_from = meta["done"]
    return slots, xi


# --- training with any optimizer -----------------------------------------------------------


def train_curve(
    task: Task,
    make_optimizer: Callable[[list], torch.optim.Optimizer] | UpdateRule,
    steps: int,
    full: bool = False,
) -> list[float]:
    """Train a fresh copy of ``task``'s network for ``steps`` steps; the training loss at
    every step (on that step's batch, before the update) and after the last (with
    ``full=True``: on the task's whole training set, a far less noisy final number).

    ``make_optimizer`` is ``lambda named_params: torch.optim.Adam(...)`` style (it gets
    ``model.named_parameters()`` as a list), or an :class:`UpdateRule` (run through a
    :class:`LearnedOptimizer`).
    """
    model = copy.deepcopy(task.model)
    init = task.init()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(init[n])
    named = list(model.named_parameters())
    if isinstance(make_optimizer, UpdateRule):
        opt = LearnedOptimizer(named, make_optimizer, space=task.space)
    else:
        opt = make_optimizer(named)
    losses = []
    for t in range(steps + 1):
        x, y = (task.x, task.y) if full and t == steps else task.batch(t)
        with torch.set_grad_enabled(t < steps):
            loss = torch.nn.functional.cross_entropy(_logits(model, x), y.reshape(-1))
        value = float(loss.detach())
        losses.append(value if math.isfinite(value) else float("inf"))
        if t == steps or not math.isfinite(value):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses += [float("inf")] * (steps + 1 - len(losses))
    return losses


def _logits(model, x):
    out = model(x)
    return out.reshape(-1, out.shape[-1])


def tune_lr(
    tasks: Sequence[Task],
    make: Callable[[list, float], torch.optim.Optimizer],
    grid: Sequence[float],
    steps: int,
    full: bool = True,
) -> tuple[float, dict[float, float]]:
    """The learning rate of ``grid`` with the lowest mean final training loss over
    ``tasks`` (on the whole training set unless ``full=False``):
    ``(best lr, {lr: mean final loss})``."""
    scores = {}
    for lr in grid:
        finals = [
            train_curve(t, lambda named, lr=lr: make(named, lr), steps, full)[-1] for t in tasks
        ]
        scores[lr] = sum(finals) / len(finals)
    best = min(scores, key=lambda k: (not math.isfinite(scores[k]), scores[k]))
    return best, scores
