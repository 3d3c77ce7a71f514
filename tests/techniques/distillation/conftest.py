"""Tiny randomly initialised Hugging Face encoders and decoders, and token batches with padding."""

from __future__ import annotations

import pytest
import torch

from modelpress.models import build_from_source
from modelpress.models.source import ModelSource


def bert_config(layers: int = 2, hidden: int = 32, heads: int = 2) -> dict:
    """A tiny BERT config dict (vocabulary of 100 tokens)."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 100,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.2,  # 10x BERT's: attention far from uniform at random init
    }


def llama_config(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2) -> dict:
    """A tiny Llama causal-LM config dict (vocabulary of 50 tokens)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 50,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 64,
        "initializer_range": 0.2,
    }


def build_hf(config: dict, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) HF model tagged with an ``hf:`` source (saves/loads)."""
    torch.manual_seed(seed)
    return build_from_source(ModelSource(f"hf:/tiny-{config['model_type']}", {"config": config}))


def token_batches(
    n_batches: int, batch: int = 8, seq: int = 12, vocab: int = 100, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Unlabeled ``{"input_ids", "attention_mask"}`` batches; every other row is padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        lengths = torch.randint(seq // 2, seq, (batch // 2,), generator=gen)
        for row, length in zip(range(0, batch, 2), lengths.tolist(), strict=False):
            mask[row, length:] = 0
            ids[row, length:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture()
def make_bert():
    """``make_bert(layers, hidden, heads, seed=0)``: a tiny random BERT encoder."""
    return lambda layers=2, hidden=32, heads=2, seed=0: build_hf(
        bert_config(layers, hidden, heads), seed
    )


@pytest.fixture()
def make_llama():
    """``make_llama(layers, hidden, heads, kv_heads, seed=0)``: a tiny random Llama causal LM."""
    return lambda layers=2, hidden=32, heads=4, kv_heads=2, seed=0: build_hf(
        llama_config(layers, hidden, heads, kv_heads), seed
    )


@pytest.fixture()
def tokens():
    """``tokens(n_batches, batch=8, seq=12, vocab=100, seed=0)``: padded unlabeled batches."""
    return token_batches
