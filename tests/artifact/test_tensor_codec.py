"""One tensor to payloads and back: dense vs sparse layout chosen by size, exact decoding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact.codecs import RawCodec
from modelpress.artifact.tensor_codec import decode_tensor, encode_tensor
from modelpress.errors import ArtifactError
from modelpress.techniques.pruning.nm import nm_mask
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


# --- the N:M layout --------------------------------------------------------------------------


def nm_weight(shape, n, m, extra_zeros=0, seed=0):
    """A random weight pruned by prune.nm's ``nm_mask``, then ``extra_zeros`` kept ones zeroed."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w = w * nm_mask(w.abs(), n, m)
    kept = torch.nonzero(w.reshape(-1)).squeeze(1)
    w.view(-1)[kept[torch.randperm(kept.numel(), generator=g)[:extra_zeros]]] = 0.0
    return w


def random_sparse(shape, density, seed=0):
    """A random weight with about ``density`` of its entries kept, anywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def with_codec(w, kind):
    """``w`` as a model would hold it under ``kind``, and the codec that stores it."""
    if kind in ("fp32", "fp16"):
        w = w.half() if kind == "fp16" else w
        return w, None
    bits = 4 if kind == "int4" else 8
    fq = AffineFakeQuant(
        w, bits, symmetric=False, granularity="group", group_size=8, scale_dtype="float16"
    )
    return fq(w).detach(), fq.value_codec()


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int4", "int8"])
@pytest.mark.parametrize("extra_zeros", [0, 3])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("shape", [(16, 32), (8, 16, 3, 3)])  # Linear, Conv2d (out, in, kh, kw)
def test_nm_weights_round_trip_bit_exact(shape, n, m, extra_zeros, kind):
    w, codec = with_codec(nm_weight(shape, n, m, extra_zeros), kind)
    rec, payloads, back = roundtrip(w, codec)
    assert back.dtype == w.dtype and torch.equal(back, w)
    if extra_zeros and codec is None:
        return  # at 16/32 bits a kept zero costs more than a bitmask bit: either may win
    bits = math.ceil(math.log2(math.comb(m, n)))
    assert rec["layout"] == {"format": "nm", "n": n, "m": m, "bits": bits}
    kept = w.numel() // m * n  # zeros included
    if codec is None:
        assert payloads["w/values"].numel() == kept
    else:
        assert rec["packing"]["count"] == kept


@pytest.mark.parametrize(
    ("n", "m", "index_bytes", "bits_per_weight"),
    [(2, 4, 768, 0.75), (4, 8, 896, 0.875), (1, 4, 512, 0.5)],
)
def test_nm_index_bytes_are_exact(n, m, index_bytes, bits_per_weight):
    w = nm_weight((64, 128), n, m)  # 8192 weights
    rec, payloads = encode_tensor("w", w)
    assert rec["layout"]["format"] == "nm" and "nnz" not in rec["layout"]
    index = payloads["w/index"]
    assert index.dtype == torch.uint8 and index.numel() == index_bytes
    assert index_bytes * 8 / w.numel() == bits_per_weight  # the bitmask's is 1.0
    assert payloads["w/values"].numel() == w.numel() // m * n


@pytest.mark.parametrize(
    "w",
    [
        nm_weight((16, 32), 2, 4).T.contiguous(),  # 2:4 along dim 0, not along the inputs
        random_sparse((8, 16, 3, 3), density=0.4),
    ],
    ids=["nm-along-dim-0", "unstructured-conv"],
)
def test_non_nm_sparse_tensors_keep_a_positional_index(w):
    rec, _, back = roundtrip(w)
    assert rec["layout"]["format"] in ("bitmask", "delta") and torch.equal(back, w)


def test_many_extra_zeros_fall_back_to_the_smaller_positional_index():
    w = nm_weight((16, 32), 2, 4, extra_zeros=100)  # 156 of 512 nonzero: nm stores 256
    rec, _, back = roundtrip(w)
    assert rec["layout"]["format"] in ("bitmask", "delta") and torch.equal(back, w)


@pytest.fixture()
def nm_encoded():
    return encode_tensor("w", nm_weight((8, 16), 2, 4))  # 32 groups: 12 bytes of codes


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda r, p: p.update({"w/index": p["w/index"][:-1]}), "w: nm index holds 11 bytes; "),
        (lambda r, p: p["w/index"].__setitem__(0, 0xFF), "w: nm index code 7 of group 0 is out"),
        (lambda r, p: r["layout"].pop("n"), "w: the nm layout record lacks 'n'"),
        (lambda r, p: r["layout"].update(bits=4), "w: nm layout 2:4 has 3-bit codes, not 4"),
        (lambda r, p: r["layout"].update(m=3), "w: nm layout 2:3 has 2-bit codes, not 3"),
        (lambda r, p: r["layout"].update(m=32, bits=9), r"w: nm .* fit shape \[8, 16\]"),
        (lambda r, p: r["layout"].update(format="csr"), "w: unknown layout 'csr'; this modelpress"),
        (lambda r, p: r["payloads"].pop("index"), "w: the nm layout has no index payload"),
    ],
)
def test_corrupt_nm_index_is_an_artifact_error(nm_encoded, corrupt, match):
    rec, payloads = nm_encoded
    corrupt(rec, payloads)
    with pytest.raises(ArtifactError, match=match):
        decode_tensor("w", rec, payloads)


def test_corrupt_bitmask_index_names_the_tensor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g) * (torch.rand(16, 16, generator=g) < 0.4)
    rec, payloads = encode_tensor("w", w)
    assert rec["layout"]["format"] == "bitmask"
    payloads["w/index"] = payloads["w/index"][:-1]
    with pytest.raises(ArtifactError, match="w: bitmask index holds 31 bytes; 256 elements"):
        decode_tensor("w", rec, payloads)
