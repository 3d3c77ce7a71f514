"""Quantization: weights (and later activations) as low-bit integers."""

from modelpress.techniques.quantization import gptq, rtn  # noqa: F401
