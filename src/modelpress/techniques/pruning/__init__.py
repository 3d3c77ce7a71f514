"""Pruning: remove weights (unstructured masks now; N:M and structured in later issues)."""

from modelpress.techniques.pruning import magnitude  # noqa: F401
