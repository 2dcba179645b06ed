"""Weight datasets: make them, import the field's, read them.

* :mod:`tasks.datasets.inr` — SIREN INR datasets of images (sklearn's digits or your own),
  :class:`~tasks.datasets.inr.WeightDataset` (weights, features, graphs; augmentation,
  standardization, probes), rendering, coordinate augmentations;
* :mod:`tasks.datasets.zoo` — small-CNN zoos trained on digits, with their accuracies;
* :mod:`tasks.datasets.mixed_zoo` — zoos mixing architectures (one WeightSpace each);
* :mod:`tasks.datasets.field` — the published datasets (DWSNets, NFN, the Small CNN Zoo)
  imported from their layouts;
* :mod:`tasks.datasets.digits` — scikit-learn's digits and small models on them.
"""
