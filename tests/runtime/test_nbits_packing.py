"""The pure maths of the integer exports: code packing, block sizes, int8/uint8 weights."""

from __future__ import annotations

import pytest
import torch

from modelpress.errors import UnsupportedModuleError
from modelpress.runtime.layers import WeightCodes
from modelpress.runtime.nbits import (
    block_size,
    blocked_payloads,
    container_bits,
    dequantize_rows,
    pack_codes,
    unpack_codes,
)
from modelpress.runtime.qdq import dynamic_qparams, fake_quant_uint8, integer_weight


def codes_like(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, cols), generator=gen)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 16, 33])
def test_pack_then_unpack_is_exact(bits, cols):
    codes = codes_like(5, cols, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-cols * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_packing_puts_the_first_code_in_the_low_bits():
    assert pack_codes(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack_codes(torch.tensor([[3, 0, 1, 2]]), 2).tolist() == [[0b10_01_00_11]]


def test_container_bits():
    assert [container_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]


def weight(codes, group_size, *, bits=4, symmetric=False, float_zero=False) -> WeightCodes:
    rows, cols = codes.shape
    groups = 1 if group_size is None else -(-cols // group_size)
    gen = torch.Generator().manual_seed(1)
    scale = torch.rand(rows, groups, generator=gen) + 0.1
    if symmetric:
        zero = torch.full((rows, groups), float(1 << (bits - 1)))
    elif float_zero:
        zero = torch.rand(rows, groups, generator=gen) * ((1 << bits) - 1)
    else:
        zero = torch.randint(0, 1 << bits, (rows, groups), generator=gen).float()
    return WeightCodes(codes, scale, zero, bits, group_size, symmetric, float_zero, None)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "float_zero"),
    [(4, 16, False, False), (4, 32, True, False), (3, None, False, False),
     (2, 16, False, True), (8, None, True, False), (6, 16, False, False)],
)  # fmt: skip
def test_blocked_payloads_dequantize_to_the_weight(bits, group_size, symmetric, float_zero):
    w = weight(codes_like(6, 40, bits), group_size, bits=bits, symmetric=symmetric,
               float_zero=float_zero)  # fmt: skip
    block = block_size("fc", w)
    payloads = blocked_payloads(w, block)
    k_blocks = -(-40 // block)
    assert payloads["packed"].shape == (6, k_blocks, block * container_bits(bits) // 8)
    # symmetric grids whose zero point is the op's default 2^(bits-1) send none
    assert (payloads["zero_points"] is None) == (symmetric and container_bits(bits) == bits)
    got = dequantize_rows(payloads["packed"], payloads["scales"], payloads["zero_points"],
                          container_bits(bits), block, 40)  # fmt: skip
    assert torch.allclose(got, w.dequantized(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("cols", "group_size", "float_zero"), [(40, None, False), (64, 32, True)])
def test_groups_split_into_smaller_blocks_dequantize_to_the_weight(cols, group_size, float_zero):
    w = weight(codes_like(3, cols, 2), group_size, bits=2, float_zero=float_zero)
    payloads = blocked_payloads(w, 16)
    assert payloads["scales"].shape == (3, -(-cols // 16))
    got = dequantize_rows(payloads["packed"], payloads["scales"], payloads["zero_points"],
                          2, 16, cols)  # fmt: skip
    assert torch.allclose(got, w.dequantized(), rtol=0, atol=1e-6)


def test_block_size_is_the_group_or_one_power_of_two_block_per_row():
    assert block_size("fc", weight(codes_like(2, 40, 4), None)) == 64
    assert block_size("fc", weight(codes_like(2, 10, 4), None)) == 16
    assert block_size("fc", weight(codes_like(2, 64, 4), 32)) == 32
    assert block_size("fc", weight(codes_like(2, 1000, 4), None), max_block=256) == 256
    assert block_size("fc", weight(codes_like(2, 1024, 4), 512), max_block=256) == 256
    assert block_size("fc", weight(codes_like(2, 64, 4), 32), max_block=256) == 32
    for bad in (24, 8):
        with pytest.raises(UnsupportedModuleError, match=f"^fc: group_size {bad} cannot be"):
            block_size("fc", weight(codes_like(2, 64, 4), bad))


def test_integer_weight_is_int8_only_when_no_product_pair_can_saturate():
    seven_bit = weight(codes_like(4, 8, 7), None, bits=7, symmetric=True)
    codes, _, zero = integer_weight(seven_bit)
    assert codes.dtype == torch.int8 and int(zero.abs().max()) == 0
    assert torch.equal(codes.long(), seven_bit.codes - 64)
    full = weight(torch.tensor([[0, 255], [1, 254]]), None, bits=8, symmetric=True)
    codes, _, zero = integer_weight(full)
    assert codes.dtype == torch.uint8 and zero.tolist() == [128, 128]
    assert integer_weight(seven_bit, allow_int8=False)[0].dtype == torch.uint8


def test_dynamic_qparams_follow_dynamic_quantize_linear():
    x = torch.tensor([-1.0, 0.5, 3.0])
    scale, zero = dynamic_qparams(x)
    assert float(scale) == pytest.approx(4.0 / 255) and float(zero) == round(255 / 4)
    scale, zero = dynamic_qparams(torch.tensor([2.0, 3.0]))  # the range always holds 0
    assert float(zero) == 0 and float(scale) == pytest.approx(3.0 / 255)
    assert float(dynamic_qparams(torch.zeros(3))[0]) == 1.0
    # round half to even, saturating at the ends
    got = fake_quant_uint8(torch.tensor([0.5, 1.5, 300.0, -9.0]), torch.tensor(1.0),
                           torch.tensor(0.0))  # fmt: skip
    assert got.tolist() == [0.0, 2.0, 255.0, 0.0]
