"""One tensor to payloads and back: dense vs sparse layout chosen by size, exact decoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact.codecs import RawCodec
from modelpress.artifact.tensor_codec import decode_tensor, encode_tensor
from modelpress.errors import ArtifactError
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant


def roundtrip(t, codec=None):
    rec, payloads = encode_tensor("w", t, codec)
    return rec, payloads, decode_tensor("w", rec, payloads)


def test_dense_tensor_stays_dense():
    t = torch.randn(8, 9)
    rec, payloads, back = roundtrip(t)
    assert rec["layout"] == {"format": "dense"} and torch.equal(back, t)
    assert sum(p.numel() * p.element_size() for p in payloads.values()) == 8 * 9 * 4


@pytest.mark.parametrize(("density", "fmt"), [(0.5, "bitmask"), (0.01, "delta")])
def test_sparse_layout_picks_the_smaller_index(density, fmt):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(100, 100, generator=g) * (torch.rand(100, 100, generator=g) < density)
    rec, payloads, back = roundtrip(t)
    assert rec["layout"]["format"] == fmt and torch.equal(back, t)
    stored = sum(p.numel() * p.element_size() for p in payloads.values())
    assert stored < t.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_other_dtypes_roundtrip(dtype):
    t = (torch.randn(5, 7) > 0.3).to(dtype)
    _, _, back = roundtrip(t)
    assert back.dtype == dtype and torch.equal(back, t)


def test_scalar_and_empty_tensors():
    for t in (torch.tensor(3.5), torch.zeros(0, 4), torch.zeros(6)):
        _, _, back = roundtrip(t)
        assert torch.equal(back, t) and back.shape == t.shape


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    group=st.integers(1, 16),
    sym=st.booleans(),
    density=st.floats(0.0, 1.0),
)
def test_affine_codes_decode_to_exactly_the_fake_quantized_weight(
    bits, rows, cols, gran, group, sym, density
):
    g = torch.Generator().manual_seed(bits * 1000 + rows * 10 + cols)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    fq = AffineFakeQuant(
        w,
        bits,
        symmetric=sym,
        granularity=gran,
        group_size=group if gran == "group" else None,
        scale_dtype="float16",
    )
    wq = fq(w).detach()
    rec, _, back = roundtrip(wq, fq.value_codec())
    assert torch.equal(back, wq)
    if "packing" in rec:
        assert rec["packing"]["bits"] == bits


def test_missing_payload_is_an_artifact_error():
    rec, _ = encode_tensor("w", torch.randn(4, 4))
    with pytest.raises(ArtifactError, match="w: the artifact is missing"):
        decode_tensor("w", rec, {})


def test_wrong_code_count_is_an_artifact_error():
    w = torch.randn(4, 8)
    fq = AffineFakeQuant(
        w, 4, symmetric=False, granularity="channel", group_size=None, scale_dtype="float16"
    )
    rec, payloads = encode_tensor("w", fq(w).detach(), fq.value_codec())
    rec["packing"]["count"] = 5
    with pytest.raises(ArtifactError, match="codes stored"):
        decode_tensor("w", rec, payloads)


def test_raw_codec_bits():
    assert RawCodec(torch.float16).value_bits() == 16 and RawCodec(torch.bool).value_bits() == 1
