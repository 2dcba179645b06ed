"""What the learning loops share, one implementation each: Kendall τ, early stopping on
validation, the cosine learning-rate schedule, and the regression loop of generalization
prediction (one zoo or several)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["kendall_tau", "BestEpoch", "cosine_schedule", "fit_regression"]


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


def fit_regression(
    model: nn.Module,
    n: int,
    predict: Callable[[Tensor], Tensor],
    targets: Tensor,
    validate: Callable[[], dict[str, float]],
    *,
    epochs: int,
    patience: int | None,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | None = None,
) -> tuple[BestEpoch, list[dict], float]:
    """MSE regression of ``targets`` (``(n,)``) with Adam and a cosine schedule, early
    stopping on the validation Kendall τ: ``(best epoch, history, seconds)``, the model
    left at its best epoch's weights.

    Each epoch visits the ``n`` training examples in an order drawn from ``seed`` (whole
    batches of ``batch_size``; the remainder is dropped); ``predict(idx)`` is the model's
    ``(B,)`` predictions for the examples ``idx`` (on ``device``). ``validate()`` returns
    the epoch's validation metrics, ``val_kendall_tau`` among them (what is kept). The
    training loss is read once an epoch (no per-step host sync)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = cosine_schedule(opt, epochs * (n // batch_size))
    gen = torch.Generator().manual_seed(seed)
    best = BestEpoch(patience)
    history: list[dict] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for b in range(0, n - batch_size + 1, batch_size):
            idx = order[b : b + batch_size]
            loss = nn.functional.mse_loss(predict(idx), targets[idx].to(device or "cpu"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().double() * len(idx)
        metrics = validate()
        history.append({"epoch": epoch + 1, "train_loss": float(total) / n, **metrics})
        if best.update(metrics["val_kendall_tau"], epoch + 1, model):
            break
    best.restore(model)
    return best, history, time.perf_counter() - start
