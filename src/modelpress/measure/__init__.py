"""Measurements: parameters, nonzeros, bytes on disk, FLOPs, latency and evaluators."""

from modelpress.measure.flops import count_flops
from modelpress.measure.latency import LatencyResult, measure_latency
from modelpress.measure.metrics import (
    Evaluator,
    accuracy,
    accuracy_evaluator,
    embedding_fidelity,
    embeddings,
    fidelity_evaluator,
)
from modelpress.measure.size import (
    bits_per_weight,
    count_nonzeros,
    count_params,
    directory_bytes,
    state_dict_bytes,
)

__all__ = [
    "Evaluator",
    "LatencyResult",
    "accuracy",
    "accuracy_evaluator",
    "bits_per_weight",
    "count_flops",
    "count_nonzeros",
    "count_params",
    "directory_bytes",
    "embedding_fidelity",
    "embeddings",
    "fidelity_evaluator",
    "measure_latency",
    "state_dict_bytes",
]
