"""What users do with weights: align, merge, teleport, learned optimizers, datasets.

Each task lands with its issue; this package only fixes the import direction
(``tasks`` -> ``metanet``, ``converters``).
"""
