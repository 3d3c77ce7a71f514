"""Low-rank and tensor factorization: SVD, Tucker-2, CP and tensor-train layers.

:mod:`~modelpress.techniques.lowrank.layer_cost` times a factorized layer against the original.
"""

from modelpress.techniques.lowrank import cp, svd, tt, tucker  # noqa: F401
