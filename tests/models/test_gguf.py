"""Tests for modelpress.models.gguf: a tiny Llama written as GGUF in tmp_path, loaded back.

The file is written with ``gguf.GGUFWriter`` from a ``LlamaForCausalLM`` with random weights,
Q and K permuted the way llama.cpp's ``convert_hf_to_gguf`` stores them, a small
SentencePiece-style vocabulary (control tokens, all 256 byte tokens, a few merges) and the pad
id ``0xFFFFFFFF`` the llama2.c converter writes. Nothing here reads ``../shared/data``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import modelpress
from modelpress import Stage
from modelpress.errors import ModelError
from modelpress.models import ModelSource, build_from_source, load_model, source_of
from modelpress.models.gguf import hf_tensor_name, token_id_or_none, unpermute_rope_rows
from modelpress.models.gguf_tokenizer import NORMAL, gguf_tokenizer, spm_merges, spm_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

NO_TOKEN = 0xFFFFFFFF
HEADS, KV_HEADS = 4, 2
# pieces that merge, with their scores (higher merges first), as a SentencePiece BPE has them
MERGED = {"▁": -1.0, "a": -2.0, "b": -3.0, "c": -4.0, "l": -5.0, "o": -6.0, "h": -7.0,
          "e": -8.0, "▁a": -9.5, "bc": -9.0, "ab": -10.0, "▁h": -11.0, "el": -12.0,
          "▁he": -13.0, "ll": -14.0, "lo": -15.0, "▁hel": -16.0, "▁hello": -17.0}  # fmt: skip


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, then :data:`MERGED`."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(MERGED)
    scores = [0.0] * 259 + list(MERGED.values())
    types = [2, 3, 3] + [6] * 256 + [NORMAL] * len(MERGED)
    return tokens, scores, types


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's ``convert_hf_to_gguf`` does to HF Q/K rows (written independently)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def reference_llama(tied: bool = False) -> torch.nn.Module:
    """A seeded LlamaForCausalLM with weights large enough that logits differ clearly."""
    tokens, _, _ = vocabulary()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
        max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def gguf_name(hf_name: str) -> str:
    """Inverse of the spec's name map, by search (keeps the test independent of its tables)."""
    for layer in range(2):
        for suffix in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                       "ffn_gate", "ffn_up", "ffn_down"):  # fmt: skip
            name = f"blk.{layer}.{suffix}.weight"
            if hf_tensor_name(name) == hf_name:
                return name
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[hf_name]  # fmt: skip


def write_gguf(
    path: Path, model: torch.nn.Module, *, arch: str = "llama", tokenizer: str = "llama",
    f16: bool = False, head_copy: bool = False,
) -> Path:  # fmt: skip
    """Write ``model`` as a llama.cpp-style GGUF file at ``path``."""
    cfg = model.config
    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(NO_TOKEN)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings and not head_copy:
            continue
        t = tensor.detach()
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        array = t.numpy().astype(np.float16 if f16 and t.ndim == 2 else np.float32)
        w.add_tensor(gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Tiny:
    reference: torch.nn.Module
    path: Path
    model: torch.nn.Module  # load_model(gguf:path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    reference = reference_llama()
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", reference)
    return Tiny(reference, path, load_model(f"gguf:{path}"))


IDS = torch.tensor([[1, 276, 261, 5, 270, 259, 42, 262, 270, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, T, V)


# --- the model --------------------------------------------------------------------------


def test_logits_match_llama_built_from_the_same_weights(tiny: Tiny) -> None:
    assert isinstance(tiny.model, transformers.LlamaForCausalLM) and not tiny.model.training
    assert not tiny.model.config.tie_word_embeddings  # its head differs from the embedding
    ref = logits(tiny.reference)
    assert ref.std() > 1.0  # the comparison is not between near-constant outputs
    torch.testing.assert_close(logits(tiny.model), ref, rtol=1e-5, atol=1e-5)


def test_source_records_absolute_path_and_config(tiny: Tiny) -> None:
    source = source_of(tiny.model)
    assert source is not None and source.spec == f"gguf:{tiny.path.resolve()}"
    cfg = source.kwargs["config"]
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == KV_HEADS
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_pad_id_outside_vocabulary_means_no_pad_token(tiny: Tiny) -> None:
    cfg = tiny.model.config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (None, 1, 2)
    assert token_id_or_none(NO_TOKEN, 512) is None
    assert token_id_or_none(-1, 512) is None and token_id_or_none(None, 512) is None
    assert token_id_or_none(511, 512) == 511 and token_id_or_none(0, 512) == 0


@pytest.mark.parametrize("head_copy", [False, True])
def test_tied_embeddings_and_f16_weights(tmp_path: Path, head_copy: bool) -> None:
    # the head is absent, or stored as an exact copy of the embedding (llama2.c conversions)
    reference = reference_llama(tied=True)
    path = write_gguf(tmp_path / "t.gguf", reference, f16=True, head_copy=head_copy)
    assert ("output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}) == head_copy
    model = load_model(f"gguf:{path}")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # fp16 storage: weights within half a unit of the last place of fp16 (|w| < 2 -> 1e-3)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0.02, atol=0.05)


def test_loading_is_deterministic_and_leaves_the_global_rng_alone(tiny: Tiny) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_model(f"gguf:{tiny.path}")
    assert torch.equal(torch.rand(3), expected)
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.randn(4 * 6, 5)
    for heads in (1, 2, 4):
        torch.testing.assert_close(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
    # one head of 4 rows: llama.cpp pairs (0, 1), (2, 3); transformers pairs (0, 2), (1, 3)
    rows = unpermute_rope_rows(torch.arange(4.0)[:, None], 1).flatten()
    assert rows.tolist() == [0.0, 2.0, 1.0, 3.0]


def test_quantized_artifact_reloads_without_the_file(tiny: Tiny, tmp_path: Path) -> None:
    copy = shutil.copy(tiny.path, tmp_path / "copy.gguf")
    model = load_model(f"gguf:{copy}")
    stage = Stage.of("quant.rtn", bits=4, group_size=8, targets=["Linear"], ignore=["lm_head"])
    result = modelpress.compress(model, [stage], example_inputs={"input_ids": IDS[:1]},
                                 evaluate=lambda m: {}, latency_runs=0)  # fmt: skip
    out = result.save(tmp_path / "q4")
    gguf_tokenizer(modelpress.load(out))  # the tokenizer is found through the recorded path
    Path(copy).unlink()  # the manifest carries the config: the file is not needed any more
    reloaded = modelpress.load(out)
    assert source_of(reloaded) == source_of(model)
    in_memory = logits(result.model.eval())
    assert not torch.allclose(in_memory, logits(tiny.reference), atol=1e-3)  # it did quantize
    assert torch.equal(logits(reloaded), in_memory)


def test_source_without_config_loads_from_the_file(tiny: Tiny) -> None:
    model = build_from_source(ModelSource(f"gguf:{tiny.path}"))
    torch.testing.assert_close(logits(model), logits(tiny.reference), rtol=1e-5, atol=1e-5)


# --- the tokenizer ----------------------------------------------------------------------


def test_tokenizer_special_tokens_and_no_pad(tiny: Tiny) -> None:
    tok = gguf_tokenizer(tiny.model)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token is None and len(tok) == len(vocabulary()[0])


@pytest.mark.parametrize(
    "text",
    ["hello", "hello abc", "Once upon a time, Lily's cat sat.\nThe end!", "Héllo wörld 日本 ✓",
     "  two  spaces ", "a"],
)  # fmt: skip
def test_tokenizer_round_trips_text(tiny: Tiny, text: str) -> None:
    tok = gguf_tokenizer(f"gguf:{tiny.path}")
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and 0 not in ids  # BOS first; byte fallback, never <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_merges_by_score(tiny: Tiny) -> None:
    tok = gguf_tokenizer(tiny.path)
    tokens = vocabulary()[0]

    def pieces(text: str) -> list[str]:
        return [tokens[i] for i in tok(text)["input_ids"][1:]]

    assert pieces("hello") == ["▁hello"]
    # "bc" (-9.0) outscores "▁a" (-9.5) and "ab" (-10.0): b+c merge first, then ▁+a
    assert pieces("abc") == ["▁a", "bc"]
    assert pieces("ab") == ["▁a", "b"]  # "▁a" outscores "ab"
    assert pieces("é") == ["▁", "<0xC3>", "<0xA9>"]  # UTF-8 bytes of an unknown character


def test_without_space_prefix_or_bos() -> None:
    tokens, scores, types = vocabulary()
    tok = spm_tokenizer(tokens, scores, types, unk="<unk>", bos=None, space_prefix=False)
    enc = tok.encode("hello")
    assert enc.tokens == ["h", "el", "lo"]  # no "▁": "el" (-12) merges before "lo" (-15)
    assert tok.decode(enc.ids) == "hello"
    assert tok.decode(tok.encode(" hello").ids) == " hello"  # nothing stripped


def test_spm_merges_rank_by_score_of_the_merged_piece() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<s>"]
    scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0, 0.0]
    types = [NORMAL] * 6 + [3]
    assert spm_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


# --- errors -----------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError, match="no such file .*point gguf: at a local .gguf file"):
        load_model(f"gguf:{missing}")
    with pytest.raises(ModelError, match=str(missing)):
        gguf_tokenizer(missing)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 4)
    with pytest.raises(ModelError, match=f"gguf:{bad}: not a readable GGUF file"):
        load_model(f"gguf:{bad}")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "gpt2.gguf", reference_llama(), arch="gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported .*hf: format"):
        load_model(f"gguf:{path}")


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bpe.gguf", reference_llama(), tokenizer="gpt2")
    load_model(f"gguf:{path}")  # the model itself loads
    with pytest.raises(ModelError, match="tokenizer model 'gpt2' is not supported"):
        gguf_tokenizer(path)


def test_tokenizer_of_a_model_not_from_gguf() -> None:
    with pytest.raises(ModelError, match="not loaded from a gguf: spec .*pass the .gguf path"):
        gguf_tokenizer(torch.nn.Linear(2, 2))
