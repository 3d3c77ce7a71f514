"""Pruning: unstructured (magnitude, random, gradual) and N:M semi-structured masks."""

from modelpress.techniques.pruning import gradual, magnitude, nm, random  # noqa: F401
