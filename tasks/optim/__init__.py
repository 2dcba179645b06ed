"""Optimization with weight symmetries.

* :mod:`tasks.optim.teleport` — symmetry teleportation around any ``torch.optim``
  optimizer (scaling, GL(n));
* :mod:`tasks.optim.scale_invariant` — optimizers for scale-invariant weights;
* :mod:`tasks.optim.learned_opt` — learned optimizers whose update is a metanetwork, and
  their meta-training.
"""
