"""What the learning jobs report: one implementation each."""

from __future__ import annotations

from torch import Tensor

__all__ = ["kendall_tau"]


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
