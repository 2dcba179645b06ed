"""What users do with weights, grouped by job.

* :mod:`tasks.checkpoints` — the checkpoint engine: mergekit's config language → a plan of
  output tensors → a streaming executor into Hugging Face folders; one
  :class:`~tasks.checkpoints.Checkpoint`, one writer, alignment as a stage
  (``metanet align``, ``merge``, ``barrier``);
* :mod:`tasks.align` — Git Re-Basin: weight matching, activation matching, STE, for any
  WeightSpace, :func:`tasks.align.verify_aligned`; :mod:`tasks.align.trees`: soft tree
  ensembles and their tree permutation / subtree flip / level order symmetries;
* :mod:`tasks.merge` — interpolation, MergeMany, loss barriers and plots, BatchNorm and
  REPAIR statistics repair; :mod:`tasks.merge.methods`: every merge method of mergekit
  0.1.5, one tensor at a time;
* :mod:`tasks.datasets` — weight datasets: INRs of images (``inr``), CNN zoos (``zoo``,
  ``mixed_zoo``), the field's published datasets (``field``), scikit-learn's digits;
* :mod:`tasks.learn` — metanetworks trained on them: ``train``, ``generalization``,
  ``inr_edit``;
* :mod:`tasks.optim` — optimization with symmetries: ``teleport``, ``scale_invariant``,
  ``learned_opt``.

The flat names of the release before (``tasks.inr``, ``tasks.train``,
``tasks.merge_methods``, ``tasks.stream``, ...) stay importable: each is an alias of its
module's new place, the same module object.

Imports point one way: ``tasks`` -> ``metanet``, ``converters``.
"""
