"""One checkpoint engine: config → plan → executor, in mergekit's shape.

* :mod:`~tasks.checkpoints.config`: mergekit's YAML language (models or slices, scalar /
  gradient / filter parameters, dtype and out_dtype, tokenizer_source, chat_template),
  plus our ``align:`` stage per model; a config is also what CLI flags build;
* :mod:`~tasks.checkpoints.sources`: inputs read from their headers (files, folders,
  hub ids in the local Hugging Face cache); nothing is traced;
* :mod:`~tasks.checkpoints.plan`: every output tensor with its inputs, method and
  parameters resolved, checked before any tensor is read;
* :mod:`~tasks.checkpoints.align_stage`: the only place a WeightSpace is built, when a
  model asks for ``align: weight``;
* :mod:`~tasks.checkpoints.executor`: lazy reads, one merge rule per method
  (:func:`tasks.merge_methods.merge_tensor`), a streaming writer into shards that checks
  every tensor finite, a drop-in Hugging Face folder.

``merge_checkpoints(config, out)`` runs all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.checkpoints.config import MergeConfig, load_config, parse_config
from tasks.checkpoints.executor import execute
from tasks.checkpoints.plan import MergePlan, TensorPlan, plan_merge
from tasks.checkpoints.sources import Source, open_source, resolve_model

__all__ = [
    "MergeConfig",
    "load_config",
    "parse_config",
    "Source",
    "open_source",
    "resolve_model",
    "MergePlan",
    "TensorPlan",
    "plan_merge",
    "execute",
    "merge_checkpoints",
]


def merge_checkpoints(
    config: MergeConfig,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    device: str = "cpu",
    max_shard: int | None = None,
    max_sweeps: int = 100,
    low_memory: bool = False,
    progress: bool = False,
    quiet: bool = True,
) -> Path:
    """Open the config's models, plan, align where asked, merge into ``out``."""
    from tasks.checkpoints.align_stage import align_sources

    sources = {ref: open_source(ref) for ref in config.paths()}
    plan = plan_merge(config, sources)
    readers = align_sources(
        config,
        plan,
        seed=seed,
        max_sweeps=max_sweeps,
        low_memory=low_memory,
        progress=progress,
        quiet=quiet,
        device=device,
    )
    return execute(
        plan,
        out,
        config=config,
        readers=readers,
        max_shard=max_shard,
        seed=seed,
        device=device,
        progress=progress,
    )
