"""Quantization: weights (and later activations) as low-bit integers."""

from modelpress.techniques.quantization import (  # noqa: F401
    awq,
    binary,
    cast,
    gptq,
    hqq,
    int8_dynamic,
    int8_static,
    mixed,
    qat,
    rtn,
    ternary,
)
