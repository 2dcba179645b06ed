"""Merging aligned checkpoints: interpolation, MergeMany, barriers, repair, TIES.

All functions take and return state dicts (``{name: Tensor}``); none modifies its inputs.
Integer tensors (``num_batches_tracked``) are taken from the first checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from metanet.space import Element, WeightSpace
from tasks.align import check_same_architecture, weight_matching

__all__ = [
    "interpolate",
    "average",
    "merge_many",
    "Barrier",
    "evaluator",
    "loss_barrier",
    "repair_batchnorm",
    "repair",
    "task_arithmetic",
    "ties_merge",
]

Weights = Mapping[str, Tensor]


def interpolate(weights_a: Weights, weights_b: Weights, alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * a + alpha * b`` for floating tensors; others from a."""
    out = {}
    for name, wa in weights_a.items():
        if name not in weights_b:
            raise KeyError(f"checkpoint b has no tensor {name!r}")
        wb = weights_b[name]
        if tuple(wa.shape) != tuple(wb.shape):
            raise ValueError(f"tensor {name!r}: shapes {tuple(wa.shape)} and {tuple(wb.shape)}")
        out[name] = torch.lerp(wa, wb.to(wa.dtype), alpha) if wa.is_floating_point() else wa
    return out


def average(weights: Sequence[Weights], coefficients: Sequence[float] | None = None):
    """Weighted average of checkpoints (default uniform)."""
    if not weights:
        raise ValueError("nothing to average")
    coef = list(coefficients) if coefficients is not None else [1 / len(weights)] * len(weights)
    if len(coef) != len(weights):
        raise ValueError(f"{len(coef)} coefficients for {len(weights)} checkpoints")
    out = {}
    for name, w0 in weights[0].items():
        if not w0.is_floating_point():
            out[name] = w0
            continue
        acc = torch.zeros_like(w0)
        for c, w in zip(coef, weights):
            acc += c * w[name].to(w0.dtype)
        out[name] = acc
    return out


def merge_many(
    weights: Sequence[Weights],
    space: WeightSpace,
    *,
    max_rounds: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Tensor], list[Element]]:
    """MergeMany (Git Re-Basin, Alg. 3): align every model to the mean of the others.

    Rounds visit the models in random order; model i is weight-matched to the average of
    the other (already aligned) models. Stops after a round in which no permutation
    changes. Returns ``(merged average, element per model)``, where element i maps the
    *original* model i onto the common basis.
    """
    if len(weights) < 2:
        raise ValueError("merge_many needs at least two checkpoints")
    for w in weights[1:]:
        check_same_architecture(space, weights[0], w)
    rng = np.random.default_rng(seed)
    elements = [space.identity() for _ in weights]
    aligned = [dict(w) for w in weights]
    rounds = range(max_rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="merge_many", unit="round")
    for _ in rounds:
        changed = False
        for i in rng.permutation(len(weights)):
            others = average([aligned[j] for j in range(len(weights)) if j != i])
            g = weight_matching(space, others, weights[i], init=elements[i], seed=seed)
            if any(not torch.equal(g[k], elements[i][k]) for k in g):
                changed = True
                elements[i] = g
                aligned[i] = space.apply(weights[i], g)
        if not changed:
            break
    return average(aligned), elements


# --------------------------------------------------------------------------- barriers
@dataclass
class Barrier:
    """A loss curve along the line from a to b, and its barrier.

    ``barrier`` is ``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]``; ``midpoint``
    the same quantity at ``alpha = 0.5``.
    """

    alphas: list[float]
    losses: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def excess(self) -> list[float]:
        la, lb = self.losses[0], self.losses[-1]
        return [lo - ((1 - a) * la + a * lb) for a, lo in zip(self.alphas, self.losses)]

    @property
    def barrier(self) -> float:
        return max(self.excess)

    @property
    def midpoint(self) -> float:
        i = int(np.argmin([abs(a - 0.5) for a in self.alphas]))
        return self.excess[i]

    def table(self) -> str:
        keys = list(self.extra)
        head = "| alpha | loss | " + " | ".join(keys) + (" |" if keys else "")
        rows = [head.rstrip(" |") + " |", "|---:|---:|" + "---:|" * len(keys)]
        for i, (a, lo) in enumerate(zip(self.alphas, self.losses)):
            cells = [f"{a:.2f}", f"{lo:.4f}"] + [f"{self.extra[k][i]:.4f}" for k in keys]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


def plot_barriers(
    curves: Mapping[str, Barrier | Sequence[Barrier]], path, title: str = "", ylabel: str = "loss"
):
    """Save a plot of several barrier curves (label -> :class:`Barrier`) to ``path``.

    A label may map to several curves (one per pair of networks): the plot then shows
    their mean with the min-max range shaded, and the legend the mean ± std barrier.
    Written through a temporary file and a rename: an existing plot is never left half
    written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metanet.io import atomic_write

    # labels "panel: curve" share a panel per prefix
    panels: dict[str, dict[str, Barrier]] = {}
    for label, c in curves.items():
        panel, _, name = label.rpartition(": ")
        panels.setdefault(panel, {})[name or label] = c
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.8 * len(panels), 3.6), dpi=120, squeeze=False
    )
    for ax, (panel, group) in zip(axes[0], panels.items()):
        for name, c in group.items():
            if isinstance(c, Barrier):
                ax.plot(
                    c.alphas, c.losses, marker="o", ms=3, label=f"{name} (barrier {c.barrier:.3f})"
                )
                continue
            losses = np.array([x.losses for x in c])
            barriers = np.array([x.barrier for x in c])
            spread = f" ± {barriers.std(ddof=1):.3f}" if len(c) > 1 else ""
            label = f"{name} (barrier {barriers.mean():.3f}{spread}, {len(c)} pairs)"
            (line,) = ax.plot(c[0].alphas, losses.mean(0), marker="o", ms=3, label=label)
            ax.fill_between(
                c[0].alphas, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.15
            )
        ax.set_xlabel("alpha  (0 = model a, 1 = model b)")
        ax.set_ylabel(ylabel)
        ax.set_title(" · ".join(p for p in (title, panel) if p), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    suffix = str(path).rsplit(".", 1)[-1] if "." in str(path) else "png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix))
    finally:
        plt.close(fig)


def evaluator(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    accuracy: bool = False,
) -> Callable[[Weights], float | tuple[float, float]]:
    """A function ``weights -> mean loss`` (and accuracy) of ``model`` over ``data``.

    The model's own weights are never touched (``torch.func.functional_call``).
    """
    from torch.func import functional_call

    batches = list(data)
    module = copy.deepcopy(model).eval()

    @torch.no_grad()
    def evaluate(weights: Weights):
        total, correct, n = 0.0, 0, 0
        for x, y in batches:
            out = functional_call(module, dict(weights), (x,), tie_weights=False)
            total += float(loss_fn(out, y)) * len(y)
            if accuracy:
                correct += int((out.argmax(-1) == y).sum())
            n += len(y)
        return (total / n, correct / n) if accuracy else total / n

    return evaluate


def loss_barrier(
    evaluate: Callable[[Weights], float | tuple],
    weights_a: Weights,
    weights_b: Weights,
    *,
    alphas: int | Sequence[float] = 11,
    repair_fn: Callable[[dict, float], dict] | None = None,
) -> Barrier:
    """Evaluate along ``interpolate(a, b, alpha)``; returns a :class:`Barrier`.

    ``evaluate(weights)`` returns a loss, or ``(loss, metric, ...)`` (extra values are kept
    in ``Barrier.extra`` as ``metric1``...); :func:`evaluator` builds one.
    ``repair_fn(weights, alpha)`` (e.g. batch-norm statistics) runs before evaluating.
    """
    grid = list(np.linspace(0, 1, alphas)) if isinstance(alphas, int) else list(alphas)
    losses, extra = [], {}
    for alpha in grid:
        w = interpolate(weights_a, weights_b, float(alpha))
        if repair_fn is not None and 0 < alpha < 1:
            w = repair_fn(w, float(alpha))
        r = evaluate(w)
        vals = r if isinstance(r, tuple) else (r,)
        losses.append(float(vals[0]))
        for k, v in enumerate(vals[1:], 1):
            extra.setdefault(f"metric{k}", []).append(float(v))
    return Barrier([float(a) for a in grid], losses, extra)


# --------------------------------------------------------------------------- repair
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def repair_batchnorm(model: nn.Module, weights: Weights, data: Iterable) -> dict[str, Tensor]:
    """Recompute every BatchNorm's running statistics for ``weights`` on ``data``.

    Interpolated weights keep the endpoints' statistics, which no longer match their
    activations; this resets them and averages over the data (cumulative, not momentum).
    Returns new weights; the model and ``weights`` are unchanged.
    """
    module = copy.deepcopy(model)
    module.load_state_dict(dict(weights))
    module.eval()
    norms = [m for m in module.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return dict(weights)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in data:
        module(batch[0] if isinstance(batch, (tuple, list)) else batch)
    state = module.state_dict()
    return {k: state[k].detach().clone() if k in state else v for k, v in weights.items()}


_REPAIRABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def _channel_stats(module: nn.Module, names: Sequence[str], data: list) -> dict:
    """Per-output-channel mean and std of the listed submodules' outputs."""
    sums: dict[str, list] = {}
    hooks = []
    mods = dict(module.named_modules())
    for name in names:
        dim = -1 if isinstance(mods[name], nn.Linear) else 1

        def hook(_m, _i, out, name=name, dim=dim):
            f = out.movedim(dim, 0).reshape(out.shape[dim], -1).double()
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + f.sum(1)
            s[1] = s[1] + (f * f).sum(1)
            s[2] += f.shape[1]

        hooks.append(mods[name].register_forward_hook(hook))
    try:
        for batch in data:
            module(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (s, ss, n) in sums.items():
        mean = s / n
        out[name] = (mean, (ss / n - mean * mean).clamp_min(0).sqrt())
    return out


@torch.no_grad()
def repair(
    model: nn.Module,
    merged: Weights,
    weights_a: Weights,
    weights_b: Weights,
    data: Iterable,
    alpha: float = 0.5,
    space: WeightSpace | None = None,
) -> dict[str, Tensor]:
    """REPAIR (Jordan et al., ICLR 2023): restore the merged model's activation statistics.

    For every hidden Linear/Conv layer (its output axis permuted, when ``space`` is given),
    the merged layer's per-channel output mean and std are rescaled to the interpolation
    of the endpoints' ``(1 - alpha) * stat_a + alpha * stat_b``, layer by layer in forward
    order (each correction sees the corrected layers before it). Folded into the
    weights: ``W *= s``, ``bias = (bias - mean) * s + target_mean``. Layers without bias
    get only the scale. Batch norms after a repaired layer are then recomputed.
    """
    data = list(data)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, _REPAIRABLE)}
    names = []
    for n in mods:
        t = space.tensors.get(f"{n}.weight") if space is not None else None
        if space is None or (
            t is not None and t.out_axis is not None and not t.axes[t.out_axis].is_fixed
        ):
            names.append(n)
    if space is None and names:
        names = names[:-1]  # without a space: every layer but the last (the logits)

    def stats_of(weights):
        m = copy.deepcopy(model)
        m.load_state_dict(dict(weights))
        return _channel_stats(m.eval(), names, data)

    sa, sb = stats_of(weights_a), stats_of(weights_b)
    out = {k: v.clone() for k, v in merged.items()}
    work = copy.deepcopy(model)
    work.load_state_dict(out)
    work.eval()
    for name in names:
        if name not in sa or name not in sb:
            continue
        mean_m, std_m = _channel_stats(work, [name], data)[name]
        mean_t = (1 - alpha) * sa[name][0] + alpha * sb[name][0]
        std_t = (1 - alpha) * sa[name][1] + alpha * sb[name][1]
        scale = std_t / (std_m + 1e-8)
        mod = dict(work.named_modules())[name]
        shape = (-1,) + (1,) * (mod.weight.dim() - 1)
        mod.weight.mul_(scale.to(mod.weight.dtype).reshape(shape))
        if mod.bias is not None:
            mod.bias.copy_(((mod.bias.double() - mean_m) * scale + mean_t).to(mod.bias.dtype))
    state = work.state_dict()
    out = {k: state[k].detach().clone() if k in state else v for k, v in out.items()}
    if any(isinstance(m, _BN) for m in model.modules()):
        out = repair_batchnorm(model, out, data)
    return out


# --------------------------------------------------------------------------- task vectors
def task_arithmetic(
    base: Weights, finetuned: Sequence[Weights], scale: float = 1.0
) -> dict[str, Tensor]:
    """``base + scale * sum_i (finetuned_i - base)`` (Ilharco et al., 2023)."""
    out = {}
    for name, w0 in base.items():
        if not w0.is_floating_point():
            out[name] = w0
            continue
        delta = sum((f[name].to(w0.dtype) - w0 for f in finetuned), torch.zeros_like(w0))
        out[name] = w0 + scale * delta
    return out


def ties_merge(
    base: Weights,
    finetuned: Sequence[Weights],
    *,
    density: float = 0.2,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

    Each task vector keeps its top ``density`` fraction of entries by magnitude (over the
    whole model); every entry's sign is elected by the summed trimmed values; the merged
    delta averages only the task values that agree with the elected sign.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = [n for n, w in base.items() if w.is_floating_point()]
    deltas = []
    for f in finetuned:
        flat = torch.cat([(f[n].to(base[n].dtype) - base[n]).reshape(-1) for n in names])
        k = max(1, int(math.ceil(density * flat.numel())))
        threshold = flat.abs().kthvalue(flat.numel() - k + 1).values
        deltas.append(torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat)))
    stack = torch.stack(deltas)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    merged = (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
    out = dict(base)
    offset = 0
    for n in names:
        size = base[n].numel()
        out[n] = base[n] + scale * merged[offset : offset + size].reshape(base[n].shape)
        offset += size
    return out
