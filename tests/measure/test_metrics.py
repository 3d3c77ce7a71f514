"""Tests for modelpress.measure.metrics: accuracy and embedding fidelity."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelpress.errors import DataError
from modelpress.measure import (
    accuracy,
    accuracy_evaluator,
    embedding_fidelity,
    embeddings,
    fidelity_evaluator,
)


def _logit_loader() -> DataLoader:
    # The inputs are the logits themselves (model = Identity); 3 of 4 argmaxes match.
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 0, 0])
    return DataLoader(TensorDataset(logits, labels), batch_size=3)


def _tiny_bert(seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    return BertModel(config)


def _token_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 100, (3, 6), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, 4:] = 0  # one padded sentence
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_accuracy_known_answer_and_mode_restored() -> None:
    model = nn.Sequential(nn.Identity(), nn.Dropout(0.0)).train()
    assert accuracy(model, _logit_loader()) == pytest.approx(0.75)
    assert model.training


def test_accuracy_evaluator() -> None:
    evaluate = accuracy_evaluator(_logit_loader())
    assert evaluate(nn.Identity()) == {"accuracy": pytest.approx(0.75)}


def test_accuracy_errors() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError, match="the loader yielded no labelled examples"):
        accuracy(nn.Identity(), empty)
    with pytest.raises(DataError, match=r"expects the loader to yield \(inputs, labels\) pairs"):
        accuracy(nn.Identity(), [torch.zeros(2, 2)])
    with pytest.raises(DataError, match=r"labels of shape \(3,\) do not match .* \(2,\)"):
        accuracy(nn.Identity(), [(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))])

    class ReturnsDict(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"scores": x}

    with pytest.raises(DataError, match="Tensor of logits or an object with .logits"):
        accuracy(ReturnsDict(), [(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))])


def test_embeddings_are_unit_norm_and_ignore_padding() -> None:
    model = _tiny_bert(0).eval()
    batch = _token_batches()[0]
    with torch.no_grad():
        emb = embeddings(model, batch)
        changed = {**batch, "input_ids": batch["input_ids"].clone()}
        changed["input_ids"][0, 4:] = 7  # only padded positions change
        emb_changed = embeddings(model, changed)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb_changed, emb, atol=1e-5, rtol=1e-5)


def test_embedding_fidelity_self_is_one_other_is_less() -> None:
    model, other = _tiny_bert(0), _tiny_bert(1)
    model.train()
    assert embedding_fidelity(model, model, _token_batches()) == pytest.approx(1.0, abs=1e-5)
    assert model.training
    assert embedding_fidelity(other, model, _token_batches()) < 0.999


def test_fidelity_evaluator_works_twice_on_a_generator() -> None:
    model = _tiny_bert(0)
    evaluate = fidelity_evaluator(model, (b for b in _token_batches()))
    assert evaluate(model)["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert evaluate(model)["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_embedding_errors() -> None:
    model = _tiny_bert(0)
    with pytest.raises(DataError, match="batches yielded no sentences"):
        embedding_fidelity(model, model, [])
    with pytest.raises(DataError, match="embeddings expects a dict of tokenized tensors"):
        embeddings(model, torch.zeros(2, 3, dtype=torch.long))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="last_hidden_state of shape"):
        embeddings(nn.Identity(), {"input": torch.zeros(2, 3)})
