"""Learned optimizers whose update rule is a metanetwork (see :mod:`.rule`, :mod:`.meta`,
:mod:`.families`)."""

from tasks.optim.learned_opt.families import FAMILIES, Family, Task, family, generated_text
from tasks.optim.learned_opt.meta import MetaResult, meta_train, train_curve, tune_lr, unroll
from tasks.optim.learned_opt.rule import (
    NUM_FEATURES,
    GMNUpdate,
    LearnedOptimizer,
    PerParameterMLP,
    UNFUpdate,
    UpdateRule,
    features,
    init_state,
)

__all__ = [
    "FAMILIES",
    "Family",
    "GMNUpdate",
    "LearnedOptimizer",
    "MetaResult",
    "NUM_FEATURES",
    "PerParameterMLP",
    "Task",
    "UNFUpdate",
    "UpdateRule",
    "family",
    "features",
    "generated_text",
    "init_state",
    "meta_train",
    "train_curve",
    "tune_lr",
    "unroll",
]
