"""Tests for modelpress.measure.flops: FLOP counting and input dispatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.errors import DataError
from modelpress.measure import count_flops


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def test_linear_flops_are_two_times_macs() -> None:
    assert count_flops(nn.Linear(4, 3), torch.randn(2, 4)) == 2 * 2 * 4 * 3


def test_tuple_and_dict_inputs() -> None:
    model = TwoInputs()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    expected = 2 * 2 * 4 * 3 + 2 * 2 * 5 * 3
    assert count_flops(model, (x, y)) == expected
    assert count_flops(model, {"x": x, "y": y}) == expected


def test_restores_training_mode_per_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    model[1].eval()  # a deliberately frozen submodule
    count_flops(model, torch.randn(3, 4))
    assert model.training and model[0].training and not model[1].training


def test_hugging_face_kwargs() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = BertModel(config)
    ids = torch.randint(0, 100, (2, 8))
    flops = count_flops(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert flops >= 2 * 2 * 8 * 32 * 64 * 2  # at least the feed-forward matmuls


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="example_inputs must be a Tensor.*Got int instead"):
        count_flops(nn.Linear(4, 3), 3)
