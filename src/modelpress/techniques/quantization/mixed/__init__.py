"""``quant.mixed``: per-layer bit widths chosen by sensitivity under a byte budget.

:mod:`.apply` holds the config and the technique, :mod:`.sensitivity` the per-layer output
error, :mod:`.budget` the bytes as the artifact stores them, and :mod:`.solver` the exact
multiple-choice knapsack that picks the widths.
"""

from modelpress.techniques.quantization.mixed.apply import MixedConfig, apply_mixed
from modelpress.techniques.quantization.mixed.solver import Allocation, solve_allocation

__all__ = ["Allocation", "MixedConfig", "apply_mixed", "solve_allocation"]
