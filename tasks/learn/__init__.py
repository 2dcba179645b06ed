"""Learning on weights: metanetworks trained on weight datasets.

* :mod:`tasks.learn.train` — ``metanet train``: every metanetwork and baseline on a
  weight dataset (classification or generalization regression), DDP, early stopping;
* :mod:`tasks.learn.generalization` — predicting a network's test accuracy from its
  weights;
* :mod:`tasks.learn.inr_edit` — editing INRs through their weights (equivariant outputs);
* :mod:`tasks.learn.metrics` — what the loops share: Kendall's τ, early stopping, the
  cosine schedule, the regression loop.
"""
