"""What users do with weights.

* :mod:`tasks.align` — Git Re-Basin: weight matching, activation matching, STE, for any
  WeightSpace; :func:`tasks.align.verify_aligned` before anything is saved.
* :mod:`tasks.merge` — interpolation, MergeMany, loss barriers and plots, BatchNorm and
  REPAIR statistics repair, task arithmetic, TIES.
* :mod:`tasks.digits` — scikit-learn's digits and small models on it.

Imports point one way: ``tasks`` -> ``metanet``, ``converters``.
"""
