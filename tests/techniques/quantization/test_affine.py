"""The affine grid: group layout, min-max qparams, exact zero, error bounds, STE gradient."""

from __future__ import annotations

import pytest
import torch

from modelpress.techniques.quantization.affine import (
    GroupLayout,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize_codes,
)


def test_group_layout_shapes_and_ids():
    layout = GroupLayout((4, 10), "group", 4)  # 3 groups per row, last one short
    assert (layout.groups_per_row, layout.num_groups, layout.width) == (3, 12, 4)
    w = torch.arange(40.0).reshape(4, 10)
    g = layout.to_groups(w)
    assert g.shape == (12, 4) and g[2].tolist() == [8.0, 9.0, 0.0, 0.0]
    assert torch.equal(layout.from_groups(g), w)
    assert layout.group_ids(torch.tensor([0, 3, 4, 9, 10, 39])).tolist() == [0, 0, 1, 2, 3, 11]
    assert GroupLayout((4, 10), "channel").num_groups == 4
    assert GroupLayout((4, 10), "tensor").num_groups == 1


def test_asymmetric_minmax_hits_the_ends_and_keeps_zero_exact():
    g = torch.tensor([[-1.0, 0.0, 3.0]])
    scale, zero = compute_qparams(g, 4, symmetric=False, scale_dtype="float32")
    assert scale.item() == pytest.approx(4.0 / 15) and zero.item() == 4.0
    codes = quantize_codes(g, scale, zero, 4)
    assert codes.tolist() == [[0.0, 4.0, 15.0]]
    assert dequantize(codes, scale[:, None], zero[:, None])[0, 1].item() == 0.0


def test_symmetric_grid_is_centred():
    g = torch.tensor([[-2.0, 0.5, 1.0]])
    scale, zero = compute_qparams(g, 8, symmetric=True, scale_dtype="float32")
    assert zero.item() == 128 and scale.item() == pytest.approx(2.0 / 127)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_is_half_a_step_inside_the_range(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    layout = GroupLayout(tuple(w.shape), "group", 32)
    scale, zero = compute_qparams(layout.to_groups(w), bits, symmetric=False)
    wq = fake_quantize(w, layout, scale, zero, bits)
    step = layout.from_groups(scale[:, None].expand(-1, 32))
    err = (wq - w).abs()
    # rounding the zero point can push a range end past the grid: at most one step there
    assert (err <= step + 1e-6).all()
    assert float((err <= step / 2 + 1e-6).float().mean()) > 0.98
    assert len(torch.unique(wq[0, :32])) <= 2**bits


def test_fp16_scales_are_exactly_representable():
    w = torch.randn(8, 8) * 1e-3
    scale, _ = compute_qparams(GroupLayout((8, 8), "channel").to_groups(w), 4, False, "float16")
    assert torch.equal(scale.half().float(), scale)
    tiny, _ = compute_qparams(torch.zeros(2, 4), 4, False, "float16")
    assert (tiny > 0).all()  # all-zero groups still get a usable scale


def test_straight_through_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    layout = GroupLayout((4, 8), "channel")
    scale, zero = compute_qparams(layout.to_groups(w.detach()), 4, symmetric=False)
    fake_quantize(w, layout, scale, zero, 4).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))
