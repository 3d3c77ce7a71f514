"""Tensors with entropy-coded integer streams: exact decoding, honest size choices, errors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact.bitpack import pack_bits
from modelpress.artifact.codecs import EncodedValues, register_codec
from modelpress.artifact.packing import EntropyCoding, pack_symbols
from modelpress.artifact.tensor_codec import decode_tensor, encode_tensor
from modelpress.errors import ArtifactError
from modelpress.techniques.pruning.nm import nm_mask
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant

ANS, HUFFMAN = EntropyCoding("ans"), EntropyCoding("huffman")


def roundtrip(t, codec=None, coding=ANS):
    rec, payloads = encode_tensor("w", t, codec, coding)
    return rec, payloads, decode_tensor("w", rec, payloads)


def cost(rec: dict, payloads: dict) -> int:
    """What a tensor costs in the artifact: payload bytes + the layout and packing records
    (without the note saying why a stream stayed bit-packed)."""
    packing = {k: v for k, v in rec.get("packing", {}).items() if k != "why_bitpack"}
    records = [rec["layout"], *([packing] if packing else [])]
    nbytes = sum(p.numel() * p.element_size() for p in payloads.values())
    return nbytes + sum(len(json.dumps(r, separators=(",", ":"))) for r in records)


def sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def quantized(w, bits=4, gran="channel"):
    fq = AffineFakeQuant(w, bits, symmetric=False, granularity=gran, group_size=None,
                         scale_dtype="float16")  # fmt: skip
    return fq(w).detach(), fq.value_codec()


@register_codec("test_lut")
@dataclass(frozen=True)
class LutCodec:
    """A stand-in for any codec that returns ``codes`` (e.g. k-means): value = table[code]."""

    table: torch.Tensor
    name: ClassVar[str] = "test_lut"

    def value_bits(self) -> float:
        return 3.0

    def encode(self, values, positions, shape) -> EncodedValues:
        codes = torch.searchsorted(self.table, values.contiguous())
        return EncodedValues({}, {"table": self.table}, codes.numpy().astype(np.int64), 3)

    @staticmethod
    def decode(meta: dict[str, Any], payloads, codes, positions, shape) -> torch.Tensor:
        return payloads["table"][torch.from_numpy(codes)]


# --- exact round trips --------------------------------------------------------------------


@pytest.mark.parametrize("coding", [ANS, HUFFMAN], ids=["ans", "huffman"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(8, 9),  # dense float: nothing to code
        lambda: sparse((64, 96), 0.1),  # raw floats behind a coded index
        lambda: torch.zeros(0, 5),
        lambda: torch.tensor(2.5),
        lambda: torch.rand(6, 7) > 0.5,  # bool
        lambda: torch.zeros(16, 16),  # nothing kept
        lambda: torch.randn(16, 32) * nm_mask(torch.randn(16, 32).abs(), 2, 4),
    ],
)
def test_raw_tensors_round_trip_bit_exact(make, coding) -> None:
    t = make()
    _rec, _payloads, back = roundtrip(t, coding=coding)
    assert back.dtype == t.dtype and torch.equal(back, t)


@settings(max_examples=15, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 12),
    cols=st.integers(1, 64),
    density=st.floats(0.0, 1.0),
    coder=st.sampled_from(["ans", "huffman"]),
    payloads=st.sampled_from(["all", "values", "indices"]),
)
def test_quantized_tensors_round_trip_and_never_cost_more_than_bitpacking(
    bits, rows, cols, density, coder, payloads
) -> None:
    w, codec = quantized(sparse((rows, cols), density, seed=rows * 100 + cols), bits)
    coding = EntropyCoding(coder, payloads)
    rec, stored, back = roundtrip(w, codec, coding)
    assert torch.equal(back, w)
    plain_rec, plain_stored = encode_tensor("w", w, codec)
    assert cost(rec, stored) <= cost(plain_rec, plain_stored)


def test_any_codec_returning_codes_is_coded() -> None:
    table = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0])
    g = torch.Generator().manual_seed(0)
    w = table[torch.multinomial(torch.tensor([0.05, 0.1, 0.7, 0.1, 0.05]), 4096, True, generator=g)]
    rec, _stored, back = roundtrip(w.reshape(64, 64), LutCodec(table))
    assert torch.equal(back, w.reshape(64, 64))
    coded = [rec["layout"].get("packing", {}).get("kind"), rec.get("packing", {}).get("kind")]
    assert "ans" in coded  # the zeros go to a coded index or stay as a coded code


# --- what gets coded, and why not -------------------------------------------------------------


def test_a_sparse_index_is_coded_near_its_entropy() -> None:
    w = sparse((300, 784), 0.1)  # H(0.1) = 0.469 bits per element
    for coding, fmt in ((ANS, {"bitmask", "gaps"}), (HUFFMAN, {"gaps"})):
        rec, stored, back = roundtrip(w, coding=coding)
        assert torch.equal(back, w)
        assert rec["layout"]["format"] in fmt and rec["layout"]["packing"]["kind"] == coding.coder
        index_bits = 8 * stored["w/index"].numel() / w.numel()
        assert index_bits < (0.48 if coding is ANS else 0.51)  # plain delta: 0.55, bitmask: 1


def test_skewed_codes_are_ans_coded_below_one_bit() -> None:
    table = torch.tensor([0.0, 1.0])
    w = (torch.rand(128, 128, generator=torch.Generator().manual_seed(0)) < 0.02).float()
    _rec, stored, back = roundtrip(w, LutCodec(table))
    assert torch.equal(back, w)
    total_bits = 8 * sum(p.numel() for k, p in stored.items() if k != "w/table")
    assert total_bits / w.numel() < 0.2  # H(0.02) = 0.14 bits per weight


def test_payload_choice_keeps_the_other_streams_plain() -> None:
    w, codec = quantized(sparse((256, 512), 0.1), 4, "tensor")  # normal: skewed 4-bit codes
    values_only, _, _ = roundtrip(w, codec, EntropyCoding("ans", "values"))
    assert "packing" not in values_only["layout"] and values_only["packing"]["kind"] == "ans"
    indices_only, _, _ = roundtrip(w, codec, EntropyCoding("ans", "indices"))
    assert "packing" in indices_only["layout"] and indices_only["packing"]["kind"] == "bitpack"
    assert "why_bitpack" not in indices_only["packing"]  # not tried, nothing to explain


def test_tiny_streams_stay_bit_packed_and_say_why() -> None:
    record, payload = pack_symbols(np.array([3, 1, 2]), 2, "huffman")
    assert (
        record["kind"] == "bitpack"
        and payload.tolist() == pack_bits(np.array([3, 1, 2]), 2).tolist()
    )
    assert re.fullmatch(r"huffman \d+ >= \d+ B", record["why_bitpack"])
    big = np.zeros(10_000, dtype=np.int64)
    big[::50] = 3
    assert pack_symbols(big, 2, "ans")[0]["kind"] == "ans"
    assert pack_symbols(big, 2, None)[0] == {"kind": "bitpack", "bits": 2, "count": 10_000}


def test_uncodable_streams_stay_bit_packed_with_the_reason() -> None:
    distinct = np.arange((1 << 20) + 1)  # more distinct symbols than ANS's table takes
    record, payload = pack_symbols(distinct, 21, "ans")
    assert record["kind"] == "bitpack" and "exceed ANS's" in record["why_bitpack"]
    assert payload.size == -(-distinct.size * 21 // 8)


# --- corrupt coded tensors ------------------------------------------------------------------


@pytest.fixture(params=["ans", "huffman"])
def coded(request):
    w, codec = quantized(sparse((256, 512), 0.1), 4)
    rec, stored = encode_tensor("fc.weight", w, codec, EntropyCoding(request.param))
    assert "packing" in rec["layout"] and rec["packing"]["kind"] == request.param
    return rec, stored


@pytest.mark.parametrize("part", ["index", "codes"])
def test_corrupt_coded_streams_name_the_tensor(coded, part) -> None:
    rec, stored = coded
    bad = stored[f"fc.weight/{part}"].clone()
    bad[bad.numel() // 2] ^= 0x10
    with pytest.raises(ArtifactError, match=r"^fc\.weight: .*(crc32|corrupt|symbols|sum)"):
        decode_tensor("fc.weight", rec, {**stored, f"fc.weight/{part}": bad})


@pytest.mark.parametrize("part", ["index", "codes"])
def test_truncated_coded_streams_name_the_tensor(coded, part) -> None:
    rec, stored = coded
    short = stored[f"fc.weight/{part}"][:-5]
    with pytest.raises(ArtifactError, match=r"^fc\.weight: "):
        decode_tensor("fc.weight", rec, {**stored, f"fc.weight/{part}": short})


def test_a_coded_index_that_disagrees_with_the_layout_is_caught(coded) -> None:
    rec, stored = coded
    layout = dict(rec["layout"])
    layout["nnz"] = layout["nnz"] + 1
    with pytest.raises(ArtifactError, match=r"^fc\.weight: coded \w+ (index of|holds)"):
        decode_tensor("fc.weight", {**rec, "layout": layout}, stored)
    unknown = {**rec["layout"], "format": "runs"}
    with pytest.raises(ArtifactError, match="unknown entropy-coded layout 'runs'"):
        decode_tensor("fc.weight", {**rec, "layout": unknown}, stored)
    count = {**rec["packing"], "count": 7}
    with pytest.raises(ArtifactError, match="7 codes stored for"):
        decode_tensor("fc.weight", {**rec, "packing": count}, stored)
