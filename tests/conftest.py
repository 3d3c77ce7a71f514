"""Shared fixtures: a digits-trained MLP (trained once per session) and a tiny convnet."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and never oversubscribes


@pytest.fixture(scope="session")
def trained():
    """(model, bundle): zoo:mlp trained on digits; tests must not change it."""
    from modelpress.testing import trained_mlp

    return trained_mlp()


@pytest.fixture(scope="session")
def digits(trained):
    """The digits bundle."""
    return trained[1]


@pytest.fixture()
def mlp(trained):
    """A fresh copy of the trained MLP."""
    import copy

    return copy.deepcopy(trained[0])
