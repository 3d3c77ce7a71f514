"""The tokenizer of a ``gguf:`` model, rebuilt from the GGUF file's own vocabulary.

For a SentencePiece-BPE vocabulary (``tokenizer.ggml.model = "llama"``, as llama.cpp and
llama2.c use it) the pieces and their scores become a ``tokenizers`` BPE whose merge ranks
follow the scores (SentencePiece merges the adjacent pair whose concatenation scores highest),
with byte fallback (``<0xXX>`` pieces), the leading-space convention (``▁``) and BOS in front.
Special token ids outside the vocabulary (the pad id ``0xFFFFFFFF`` of llama2.c conversions)
leave that token unset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from modelpress.errors import ModelError
from modelpress.models.gguf import gguf_value, open_gguf, token_id_or_none
from modelpress.models.source import source_of

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def spm_merges(
    tokens: list[str], scores: list[float], token_types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges, best first, equivalent to SentencePiece-BPE's score-driven merging.

    SentencePiece BPE (and llama.cpp's ``llm_tokenizer_spm``, llama2.c's ``encode``)
    repeatedly merges the adjacent pair whose concatenation is a vocabulary piece with the
    highest score. A rank-ordered merge list does the same when every split ``(l, r)`` of a
    normal piece ``p = l + r`` (both halves normal pieces) is ranked by ``-score(p)``, ties by
    the id of ``p`` then the split point.

    Args:
        tokens: the pieces, by id.
        scores: their scores (higher merges first).
        token_types: llama.cpp token types; only ``NORMAL`` (1) pieces take part.

    Returns:
        ``(left, right)`` pairs, highest priority first.
    """
    normal = {t for t, kind in zip(tokens, token_types, strict=True) if kind == NORMAL}
    ranked = [
        (-score, index, cut, piece[:cut], piece[cut:])
        for index, (piece, score, kind) in enumerate(zip(tokens, scores, token_types, strict=True))
        if kind == NORMAL
        for cut in range(1, len(piece))
        if piece[:cut] in normal and piece[cut:] in normal
    ]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _tokenizer_file(where: str | Path | nn.Module) -> str:
    """The file path behind a model loaded from ``gguf:``, a ``gguf:PATH`` spec or a path."""
    if isinstance(where, nn.Module):
        source = source_of(where)
        if source is None or not source.spec.startswith("gguf:"):
            shown = source.spec if source else "no recorded source"
            raise ModelError(f"the model was not loaded from a gguf: spec ({shown}); pass the "
                             ".gguf path to gguf_tokenizer instead.")  # fmt: skip
        return source.spec.removeprefix("gguf:")
    return str(where).removeprefix("gguf:")


def _vocabulary(reader: Any, spec: str) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of a SentencePiece (``llama``) vocabulary."""
    kind = gguf_value(reader, "tokenizer.ggml.model")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    if kind != "llama" or not tokens:
        raise ModelError(f"{spec}: tokenizer model {kind!r} is not supported; only "
                         "SentencePiece ('llama') vocabularies are.")  # fmt: skip
    scores = gguf_value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = gguf_value(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ModelError(f"{spec}: {len(tokens)} tokens but {len(scores)} scores and "
                         f"{len(types)} token types; the vocabulary is corrupt.")  # fmt: skip
    return list(tokens), [float(s) for s in scores], [int(t) for t in types]


def _special(reader: Any, tokens: list[str], key: str) -> str | None:
    index = token_id_or_none(gguf_value(reader, f"tokenizer.ggml.{key}_token_id"), len(tokens))
    return None if index is None else tokens[index]


def spm_tokenizer(
    tokens: list[str], scores: list[float], token_types: list[int], *, unk: str | None,
    bos: str | None, space_prefix: bool = True,
) -> Any:  # fmt: skip
    """A ``tokenizers.Tokenizer`` that encodes as SentencePiece BPE (llama.cpp, llama2.c) does.

    A space is prepended (always, even to text that starts with one, as llama.cpp does) and
    spaces become ``▁``; characters start as pieces, bytes as ``<0xXX>`` pieces when a
    character is not in the vocabulary; pairs merge by score (:func:`spm_merges`); ``bos`` is
    put in front when given. Control pieces are special tokens, user-defined ones added tokens.
    Decoding reverses it (and drops the prepended space).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {piece: index for index, piece in enumerate(tokens)}
    merges = spm_merges(tokens, scores, token_types)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    prepend = [normalizers.Prepend("▁")] * space_prefix
    tok.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] * space_prefix
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    kinds = list(zip(tokens, token_types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in kinds if k == CONTROL])  # fmt: skip
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in kinds if k == USER_DEFINED])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tok


def gguf_tokenizer(where: str | Path | nn.Module) -> Any:
    """The tokenizer of a GGUF file, built from its own vocabulary, scores and token types.

    SentencePiece BPE as llama.cpp and llama2.c run it (:func:`spm_tokenizer`), BOS in front
    when the file asks (``tokenizer.ggml.add_bos_token``, default true). A special id outside
    the vocabulary (e.g. the pad id ``0xFFFFFFFF``) leaves that token unset.

    Args:
        where: a model loaded from ``gguf:`` (or an artifact of one), ``gguf:PATH`` or a path.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ModelError: no GGUF file behind ``where``, or a non-SentencePiece vocabulary.
    """
    import transformers

    path = _tokenizer_file(where)
    reader = open_gguf(path)
    tokens, scores, types = _vocabulary(reader, f"gguf:{path}")
    unk, bos, eos = (_special(reader, tokens, k) for k in ("unknown", "bos", "eos"))
    add_bos = bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", True))
    tok = spm_tokenizer(
        tokens, scores, types, unk=unk, bos=bos if add_bos else None,
        space_prefix=bool(gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)),
    )  # fmt: skip
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=None,
        clean_up_tokenization_spaces=False,
    )  # fmt: skip
