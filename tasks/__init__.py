"""What users do with weights.

* :mod:`tasks.align` — Git Re-Basin: weight matching, activation matching, STE, for any
  WeightSpace; :func:`tasks.align.verify_aligned` before anything is saved.
* :mod:`tasks.merge` — interpolation, MergeMany, loss barriers and plots, BatchNorm and
  REPAIR statistics repair, task arithmetic, TIES.
* :mod:`tasks.checkpoints` — the checkpoint engine: mergekit's config language → a plan of
  output tensors → a streaming executor into Hugging Face folders; alignment as a stage.
* :mod:`tasks.merge_methods` — every merge method of mergekit 0.1.5, one tensor at a time.
* :mod:`tasks.trees` — soft tree ensembles: the model, its tree permutation / subtree
  flip / level order symmetries, and weight matching over them.
* :mod:`tasks.digits` — scikit-learn's digits and small models on it.

Imports point one way: ``tasks`` -> ``metanet``, ``converters``.
"""
