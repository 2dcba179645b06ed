"""What the learning loops share, one implementation each: Kendall τ, early stopping on
validation, the cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["kendall_tau", "BestEpoch", "cosine_schedule"]


class BestEpoch:
    """Early stopping on a validation metric (higher is better): the best epoch so far
    and the model's weights then. :meth:`update` after every epoch says whether
    ``patience`` epochs have passed without improvement (never, with ``None``). The first
    epoch always counts; a NaN metric (a constant prediction's τ) never beats another, and
    any number beats it. :meth:`restore` loads the best weights back."""

    def __init__(self, patience: int | None = None):
        self.patience = patience
        self.metric = -math.inf  # for comparisons (a NaN metric is kept as -inf)
        self.value = math.nan  # the best epoch's metric as measured
        self.epoch = 0  # 1-based; 0: no epoch yet
        self.state: dict[str, Tensor] | None = None

    def update(self, metric: float, epoch: int, model: nn.Module) -> bool:
        if self.state is None or metric > self.metric:
            # a NaN first epoch is kept as -inf: any later number beats it
            self.metric = -math.inf if math.isnan(metric) else metric
            self.value, self.epoch = metric, epoch
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self.patience is not None and epoch - self.epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def kendall_tau(pred: Tensor, target: Tensor) -> float:
    """Kendall's τ-b between predictions and targets (the rank agreement generalization
    prediction is judged by); NaN with fewer than two values or a constant side."""
    if pred.numel() < 2:
        return float("nan")
    import warnings

    from scipy.stats import kendalltau

    with warnings.catch_warnings():  # a constant input: NaN, said by the value itself
        warnings.simplefilter("ignore")
        stat = kendalltau(
            pred.detach().double().cpu().numpy(), target.detach().double().cpu().numpy()
        )
    return float(stat.statistic)


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate annealed from its value to 0 over ``steps`` optimizer steps
    (half a cosine), then held at 0."""
    steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
    )
