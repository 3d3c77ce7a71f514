"""``gguf:FILE``: a llama.cpp GGUF file as a transformers ``LlamaForCausalLM``, with its tokenizer.

The file is read with the ``gguf`` package (llama.cpp's own reader; numpy only): the
``llama.*`` metadata becomes a ``LlamaConfig``, the tensors are dequantized to float32 (any
ggml type the package knows, F32/F16/Q8_0/Q4_K/...) and renamed to the transformers layout.
llama.cpp stores Q and K with the rows of each head in *adjacent* RoPE pairs
(``x[2i], x[2i+1]``); transformers rotates *halves* (``x[i], x[i + d/2]``), so those rows are
un-permuted (:func:`unpermute_rope_rows`). Nothing goes through ``from_pretrained(gguf_file=)``:
that path needs ``accelerate`` and prints a progress bar on every load.

Special token ids come from ``tokenizer.ggml.*_token_id``. An id outside the vocabulary — the
llama2.c converter writes ``0xFFFFFFFF`` for "no padding token" — means *no such token*
(``pad_token_id = None``); it is never mapped to some other id. An ``output.weight`` that is
an exact copy of ``token_embd.weight`` is tied to it, as the model was trained.

The tokenizer is rebuilt from the file's own vocabulary by
:func:`modelpress.models.gguf_tokenizer.gguf_tokenizer`.

The source recorded on the model is ``gguf:<absolute path>`` plus the config, so an artifact
of a compressed GGUF model rebuilds its skeleton from the manifest alone (the weights come
from the artifact); the tokenizer is read from the recorded path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ModelError
from modelpress.models.source import ModelSource

SUPPORTED_ARCHITECTURES = ("llama",)
# GGUF tensor name (after "blk.N.") -> transformers name (after "model.layers.N.")
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# --------------------------------------------------------------------------- reading


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` on ``path``.

    Raises:
        ModelError: the file is missing, or it is not a GGUF file.
    """
    try:
        import gguf
    except ImportError:
        raise ModelError("gguf: specs need the 'gguf' package: pip install gguf.") from None
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"gguf:{path}: no such file ({file}); point gguf: at a local .gguf file.")
    try:
        return gguf.GGUFReader(file)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"gguf:{path}: not a readable GGUF file ({reason}); give a llama.cpp .gguf file."
        ) from None


def gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (a number, string or list), or ``default`` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def token_id_or_none(token_id: int | None, vocab_size: int) -> int | None:
    """A special token id, or None when the file says "none": absent, or outside
    ``[0, vocab_size)`` (llama.cpp converters write ``0xFFFFFFFF``, i.e. -1 as u32)."""
    if token_id is None or not 0 <= int(token_id) < vocab_size:
        return None
    return int(token_id)


def _required(reader: Any, key: str, spec: str) -> Any:
    value = gguf_value(reader, key)
    if value is None:
        raise ModelError(f"{spec}: the file has no '{key}' metadata; it is not a complete model.")
    return value


def head_is_embedding(reader: Any) -> bool:
    """Whether the output head is the token embedding: ``output.weight`` is absent, or an
    exact copy of ``token_embd.weight`` (same type, shape and bytes — llama2.c conversions
    store the tied classifier twice). Tying such a copy changes no output and stores it once.
    """
    tensors = {t.name: t for t in reader.tensors}
    head, embedding = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if head is None:
        return True
    return (
        embedding is not None
        and head.tensor_type == embedding.tensor_type
        and np.array_equal(head.shape, embedding.shape)
        and np.array_equal(head.data, embedding.data)
    )


def gguf_config(reader: Any, spec: str) -> Any:
    """The ``transformers.LlamaConfig`` the file's ``llama.*`` metadata describes.

    Args:
        reader: an open ``gguf.GGUFReader``.
        spec: the ``gguf:PATH`` spec, for messages.

    Raises:
        ModelError: an architecture other than llama, a missing key, partial rotary
            embeddings or RoPE scaling (not supported here).
    """
    import transformers

    arch = gguf_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{spec}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); convert the model to hf: format instead."
        )
    hidden, heads = (int(_required(reader, f"llama.{k}", spec)) for k in
                     ("embedding_length", "attention.head_count"))  # fmt: skip
    rope_dims = int(gguf_value(reader, "llama.rope.dimension_count", hidden // heads))
    if rope_dims != hidden // heads:
        raise ModelError(f"{spec}: RoPE on {rope_dims} of {hidden // heads} head dims is not "
                         "supported; only full rotary embeddings are.")  # fmt: skip
    scaling = gguf_value(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelError(f"{spec}: RoPE scaling {scaling!r} is not supported.")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens") or []
    vocab = int(gguf_value(reader, "llama.vocab_size", len(tokens)) or 0)
    if vocab <= 0:
        raise ModelError(f"{spec}: the file states no vocabulary size; it is not a complete model.")
    ids = {k: token_id_or_none(gguf_value(reader, f"tokenizer.ggml.{k}_token_id"), vocab)
           for k in ("bos", "eos", "padding")}  # fmt: skip
    return transformers.LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_required(reader, "llama.feed_forward_length", spec)),
        num_hidden_layers=int(_required(reader, "llama.block_count", spec)),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_value(reader, "llama.attention.head_count_kv", heads)),
        rms_norm_eps=float(gguf_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_value(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(gguf_value(reader, "llama.context_length", 2048)),
        tie_word_embeddings=head_is_embedding(reader),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["padding"],
    )


# --------------------------------------------------------------------------- weights


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K projection rows from llama.cpp's adjacent RoPE pairs to transformers' halves.

    Within each head of ``d`` rows, llama.cpp rotates rows ``(2i, 2i+1)`` together (as
    llama2.c and Meta's original code do); transformers' ``rotate_half`` rotates ``(i,
    i + d/2)``. The inverse of llama.cpp's ``convert_hf_to_gguf`` permutation: view the rows as
    ``(heads, d/2, 2)`` and swap the last two axes.

    Args:
        weight: ``(heads * d, in)``.
        n_heads: heads this projection has (the KV heads for K).

    Returns:
        ``(heads * d, in)`` with the rows reordered; a new tensor.
    """
    rows, cols = weight.shape
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    )


def hf_tensor_name(name: str) -> str | None:
    """The transformers Llama parameter name of GGUF tensor ``name`` (None if not Llama's)."""
    if name in _TOP_TENSORS:
        return _TOP_TENSORS[name]
    prefix, _, rest = name.partition(".")
    block, _, suffix = rest.partition(".")
    if prefix == "blk" and block.isdigit() and suffix in _BLOCK_TENSORS:
        return f"model.layers.{block}.{_BLOCK_TENSORS[suffix]}"
    return None


def _dequantized(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as float32 torch, shaped ``(ne1, ne0)`` = ``(out, in)`` (or ``(n,)``)."""
    from gguf import GGMLQuantizationType, dequantize

    if tensor.tensor_type == GGMLQuantizationType.F32:
        array = np.array(tensor.data, dtype=np.float32)
    else:
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(array.reshape(shape))


def gguf_state_dict(reader: Any, config: Any, spec: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file as the float32 state dict of a ``LlamaForCausalLM``.

    Raises:
        ModelError: a tensor that is not part of a plain Llama (biases, ``rope_freqs``, ...).
    """
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ModelError(f"{spec}: tensor {tensor.name!r} is not part of a plain Llama "
                             "model; this GGUF variant is not supported.")  # fmt: skip
        weight = _dequantized(tensor)
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config.num_key_value_heads)
        state[name] = weight
    return state


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], spec: str) -> None:
    expected = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ModelError(f"{spec}: the file lacks {len(missing)} Llama tensors (e.g. "
                         f"{missing[0]}); it is not a complete model.")  # fmt: skip
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelError(f"{spec}: a tensor does not fit its metadata ({first}).") from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


# --------------------------------------------------------------------------- the model


def _new_model(config: Any) -> nn.Module:
    """An untrained ``LlamaForCausalLM`` of ``config``; the global RNG is left as it was."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        return transformers.LlamaForCausalLM._from_config(config)


def load_gguf(path: str) -> tuple[nn.Module, ModelSource]:
    """Load the GGUF file ``path`` as a float32 ``LlamaForCausalLM`` in eval mode.

    Args:
        path: the ``.gguf`` file (``~`` expanded).

    Returns:
        The model and its source: ``gguf:<absolute path>`` with the config, so artifacts
        rebuild the model without reading the file again.

    Raises:
        ModelError: the file is missing, not GGUF, not a plain Llama, or incomplete.
    """
    spec = f"gguf:{path}"
    reader = open_gguf(path)
    config = gguf_config(reader, spec)
    state = gguf_state_dict(reader, config, spec)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # absent, or a copy of the embedding
    model = _new_model(config)
    _load_weights(model, state, spec)
    file = Path(path).expanduser().resolve()
    config_json = json.loads(config.to_json_string(use_diff=False))  # as the manifest holds it
    return model.eval(), ModelSource(f"gguf:{file}", {"config": config_json})


def build_gguf(source: ModelSource) -> nn.Module:
    """The model of a recorded ``gguf:`` source: from its stored config (weights to be loaded
    after), else — a source without a config — loaded from the file, weights included.

    Raises:
        ModelError: the config cannot be rebuilt, or the file cannot be loaded.
    """
    if source.kwargs.get("config"):
        from modelpress.models.hf import build_hf

        return build_hf(source)
    model, _ = load_gguf(source.spec.removeprefix("gguf:"))
    return model
