"""Pruning: unstructured (magnitude, random, gradual), N:M masks, structured (channels, heads)."""

from modelpress.techniques.pruning import (  # noqa: F401
    gradual,
    magnitude,
    nm,
    random,
    sparsegpt,
    structured,
    wanda,
)
