"""Pruning: unstructured (magnitude, random, gradual), N:M masks, structured (channels, heads)."""

from modelpress.techniques.pruning import gradual, magnitude, nm, random, structured  # noqa: F401
