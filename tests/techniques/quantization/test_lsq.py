"""LSQ maths: the paper's gradients on a hand example, initialisation, exact storage."""

from __future__ import annotations

import math

import pytest
import torch

from modelpress.artifact.tensor_codec import decode_tensor, encode_tensor
from modelpress.techniques.quantization.activation import InputQuantizer
from modelpress.techniques.quantization.lsq import (
    LSQInputQuantizer,
    LSQWeightFakeQuant,
    lsq_quantize,
    signed_range,
)


def test_lsq_gradients_match_the_paper_on_a_hand_example():
    # 3 bits signed: Qn = 4, Qp = 3; s = 0.5, so v / s = [-6, -1.4, 0.4, 1.1, 2.8, 10]
    v = torch.tensor([-3.0, -0.7, 0.2, 0.55, 1.4, 5.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    qn, qp = signed_range(3)
    g = 1 / math.sqrt(v.numel() * qp)
    out = lsq_quantize(v, step, qn, qp, g, "float32")
    assert out.tolist() == [-2.0, -0.5, 0.0, 0.5, 1.5, 1.5]
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (out * upstream).sum().backward()
    # eq. 3: -Qn below the range, -v/s + round(v/s) inside, Qp above
    d_out_d_s = torch.tensor([-4.0, 1.4 - 1, -0.4 + 0, -1.1 + 1, -2.8 + 3, 3.0])
    expected = g * float((upstream * d_out_d_s).sum())
    assert step.grad.item() == pytest.approx(expected, rel=1e-5)
    # the values: straight through the rounding inside the range, zero where clipped
    assert v.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


@pytest.mark.parametrize("step_shape", [(), (4, 1)])
def test_fused_lsq_matches_autograd_through_the_formula(step_shape):
    # the reference: autograd through round_ste(clamp(v / s)) * s; LSQ scales d/ds by g
    torch.manual_seed(0)
    v = (torch.randn(4, 50) * 2).requires_grad_()
    step = (torch.rand(step_shape) * 0.4 + 0.2).requires_grad_()
    upstream = torch.randn(4, 50)
    qn, qp, g = 8, 7, 0.01
    lsq_quantize(v, step, qn, qp, g, "float32").mul(upstream).sum().backward()
    v_ref, step_ref = v.detach().clone().requires_grad_(), step.detach().clone().requires_grad_()
    ratio = torch.clamp(v_ref / step_ref, -qn, qp)
    out = (ratio + (ratio.round() - ratio).detach()) * step_ref
    out.mul(upstream).sum().backward()
    assert torch.allclose(lsq_quantize(v, step, qn, qp, g, "float32"), out, atol=1e-6)
    assert torch.allclose(v.grad, v_ref.grad, atol=1e-6)
    assert torch.allclose(step.grad, g * step_ref.grad, rtol=1e-5, atol=1e-7)


def test_weight_quantizer_starts_at_the_papers_step_and_is_signed():
    torch.manual_seed(0)
    w = torch.randn(6, 20)
    fq = LSQWeightFakeQuant(w, 4, granularity="channel", group_size=None, scale_dtype="float32")
    assert torch.allclose(fq.step.detach(), 2 * w.abs().mean(dim=1) / math.sqrt(7))
    assert fq.grad_factor == pytest.approx(1 / math.sqrt(20 * 7))
    q = fq(w) / fq.scale[:, None]  # integer codes in [-8, 7]
    assert torch.equal(q, q.round()) and q.min() >= -8 and q.max() <= 7


@pytest.mark.parametrize(("granularity", "group_size"), [("channel", None), ("group", 8)])
def test_learned_step_is_stored_exactly(granularity, group_size):
    torch.manual_seed(0)
    w = torch.randn(5, 20)
    fq = LSQWeightFakeQuant(
        w, 3, granularity=granularity, group_size=group_size, scale_dtype="float16"
    )
    with torch.no_grad():
        fq.step.mul_(1.2345)  # a "trained" step, off the fp16 grid
    out = fq(w)
    assert not torch.equal(fq.step, fq.step.half().float())
    assert torch.equal(fq.scale, fq.step.detach().half().float())  # what forward used
    record, payloads = encode_tensor("w", out, fq.value_codec())
    assert record["packing"]["bits"] == 3
    assert torch.equal(decode_tensor("w", record, payloads), out)


@pytest.mark.parametrize("non_negative", [True, False])
def test_input_quantizer_loads_into_a_static_one(non_negative):
    torch.manual_seed(0)
    x = torch.randn(32, 10)
    x = x.relu() if non_negative else x
    lsq = LSQInputQuantizer(4)
    lsq.init_step(float(x.abs().mean()), non_negative=non_negative)
    qp = 15 if non_negative else 7
    assert lsq.scale.item() == pytest.approx(2 * float(x.abs().mean()) / math.sqrt(qp))
    with torch.no_grad():
        lsq.scale.mul_(0.9)  # as if trained
    plain = InputQuantizer(4, dynamic=False)
    plain.load_state_dict(lsq.state_dict())
    assert torch.equal(plain(x), lsq(x))
    assert torch.unique(lsq(x)).numel() <= 16
    assert (lsq(x).min() >= 0) == non_negative


def test_input_step_gets_the_lsq_gradient():
    x = torch.tensor([[0.1, 0.6, 2.0]])  # unsigned 2 bits: Qp = 3; s = 0.5: x/s = .2, 1.2, 4
    q = LSQInputQuantizer(2)
    q.init_step(1.0, non_negative=True)
    with torch.no_grad():
        q.scale.fill_(0.5)
    q(x).sum().backward()
    expected = (-0.2 + 0) + (-1.2 + 1) + 3.0
    assert q.scale.grad.item() == pytest.approx(expected / math.sqrt(3 * 3), rel=1e-5)
