"""AffineFakeQuant's extensions: per-input-column scales (in_scale) and fp16 zero points, stored
exactly by AffineCodec; plain grids keep their old records."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpress.artifact.tensor_codec import decode_tensor, encode_tensor
from modelpress.errors import ConfigError
from modelpress.techniques.quantization.affine import GroupLayout
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant


def roundtrip(w: torch.Tensor, fq: AffineFakeQuant) -> tuple[dict, dict, torch.Tensor]:
    rec, payloads = encode_tensor("w", w, fq.value_codec())
    return rec, payloads, decode_tensor("w", rec, payloads)


def quantizer(w: torch.Tensor, bits: int = 4, **kw) -> AffineFakeQuant:
    grid = {"symmetric": False, "granularity": "group", "group_size": 8, "scale_dtype": "float16"}
    return AffineFakeQuant(w, bits, **{**grid, **kw})


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    group=st.integers(1, 16),
    density=st.floats(0.0, 1.0),
    with_in_scale=st.booleans(),
    float_zero=st.booleans(),
)
def test_decode_is_bit_identical_to_the_forward_pass(
    bits, rows, cols, gran, group, density, with_in_scale, float_zero
):
    g = torch.Generator().manual_seed(bits * 1000 + rows * 10 + cols)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    in_scale = torch.rand(cols, generator=g) * 8 + 0.05 if with_in_scale else None
    groups = GroupLayout((rows, cols), gran, group if gran == "group" else None).num_groups
    zero = torch.rand(groups, generator=g) * (2**bits - 1) if float_zero else None
    scale = torch.rand(groups, generator=g) * 0.2 + 0.01 if float_zero else None
    fq = quantizer(
        w,
        bits,
        granularity=gran,
        group_size=group if gran == "group" else None,
        in_scale=in_scale,
        scale=scale,
        zero_point=zero,
        zero_dtype="float16" if float_zero else "int",
    )
    wq = fq(w).detach()
    rec, payloads, back = roundtrip(wq, fq)
    assert torch.equal(back, wq)  # dense or sparse layout alike
    assert ("w/in_scale" in payloads) == with_in_scale
    assert rec["codec"].get("zero_dtype", "int") == ("float16" if float_zero else "int")


def test_plain_grid_records_are_unchanged():
    w = torch.randn(4, 16)
    rec, payloads, _ = roundtrip(quantizer(w)(w).detach(), quantizer(w))
    assert set(payloads) == {"w/codes", "w/scale", "w/zero_point"}
    assert payloads["w/zero_point"].dtype == torch.uint8  # bit-packed integers
    assert set(rec["codec"]) == {"name", "bits", "symmetric", "granularity", "group_size",
                                 "scale_dtype"}  # fmt: skip
    fq = quantizer(w)
    assert fq.in_scale is None and not fq.float_zero


def test_in_scale_grid_quantizes_w_times_s_and_divides_it_back():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 32, generator=g), torch.randn(5, 32, generator=g)
    s = torch.rand(32, generator=g) * 4 + 0.25
    fq = quantizer(w, in_scale=s)
    assert torch.equal(fq.in_scale, s.half().float())  # stored (fp16) value used in memory
    plain = quantizer(w * fq.in_scale)
    assert torch.equal(fq.scale, plain.scale) and torch.equal(fq.zero_point, plain.zero_point)
    dequant = plain(w * fq.in_scale)  # dequant(Q(W s)), what MatMulNBits holds
    torch.testing.assert_close(fq(w), dequant / fq.in_scale, rtol=0, atol=0)
    # the runtime's form: divide the input by in_scale, then the integer matmul
    torch.testing.assert_close(x @ fq(w).T, (x / fq.in_scale) @ dequant.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(quantizer(w, in_scale=torch.ones(32))(w), quantizer(w)(w))


def test_in_scale_keeps_zeros_and_the_straight_through_gradient():
    w = torch.randn(4, 16) * (torch.rand(4, 16) < 0.5)
    fq = quantizer(w, in_scale=torch.rand(16) + 0.5)
    assert torch.all(fq(w)[w == 0] == 0)
    v = w.clone().requires_grad_(True)
    fq(v).sum().backward()
    torch.testing.assert_close(v.grad, torch.ones_like(v))


def test_float_zero_points_are_fp16_and_round_w_over_s_plus_z():
    w = torch.randn(2, 8)
    scale, zero = torch.tensor([0.1, 0.2]), torch.tensor([7.3, 6.71])
    fq = quantizer(w, granularity="channel", group_size=None, scale=scale, zero_point=zero,
                   zero_dtype="float16")  # fmt: skip
    assert fq.float_zero and torch.equal(fq.zero_point, zero.half().float())
    codes = torch.clamp(torch.round(w / fq.scale[:, None] + fq.zero_point[:, None]), 0, 15)
    expected = (codes - fq.zero_point[:, None]) * fq.scale[:, None]
    assert torch.equal(fq(w), expected)
    _, payloads, _ = roundtrip(fq(w).detach(), fq)
    assert payloads["w/zero_point"].dtype == torch.float16


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"in_scale": torch.ones(3)}, "in_scale must hold 16 positive finite fp16 values"),
        ({"in_scale": -torch.ones(16)}, "in_scale must hold 16 positive"),
        ({"in_scale": torch.full((16,), 1e6)}, "in_scale must hold 16 positive finite fp16"),
        ({"zero_dtype": "int8"}, "zero_dtype must be 'int' or 'float16'"),
        ({"symmetric": True, "zero_dtype": "float16"}, "symmetric grid has a fixed integer"),
        ({"scale": torch.ones(3), "zero_point": torch.ones(3)}, "scale must hold 8 positive"),
        ({"scale": torch.ones(8)}, "needs its zero_point too"),
        ({"scale": torch.ones(8), "zero_point": torch.full((8,), torch.nan),
          "zero_dtype": "float16"}, "zero_point must hold 8 finite"),
    ],
)  # fmt: skip
def test_bad_grid_arguments_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        quantizer(torch.randn(4, 16), **kw)
