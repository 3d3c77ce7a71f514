"""architecture.separable: depthwise-separable pairs fitted to k×k convolutions by SVD."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import NoMatchingModulesError, UnsupportedModuleError
from modelpress.measure import accuracy_evaluator
from modelpress.registry import technique_names
from modelpress.techniques.architecture.separable import (
    DepthwiseSeparable,
    SeparableConfig,
    apply_separable,
    fit_error,
    separable_cost,
    separable_factors,
    separable_pair,
    skip_reason,
)
from modelpress.testing import tiny_convnet
from modelpress.train import train_model

CONVS = {
    "stride2": lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1),
    "rect-dilated": lambda: nn.Conv2d(4, 30, (3, 5), padding=(2, 1), dilation=2),
    "reflect-nobias": lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False, padding_mode="reflect"),
}


def reconstruct(depthwise: torch.Tensor, pointwise: torch.Tensor, c_in: int) -> torch.Tensor:
    """``W_hat[o, i] = sum_j P[o, i·m + j] · D[i·m + j]`` ``(C_out, C_in, kh, kw)``."""
    c_out, m = pointwise.shape[0], pointwise.shape[1] // c_in
    p = pointwise.reshape(c_out, c_in, m)
    d = depthwise.reshape(c_in, m, *depthwise.shape[2:])
    return torch.einsum("oim,imhw->oihw", p, d)


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_full_rank_pair_reproduces_the_conv(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    full = min(conv.out_channels, conv.kernel_size[0] * conv.kernel_size[1])
    pair = separable_pair(conv, full)
    assert pair.depthwise.groups == conv.in_channels
    assert pair.depthwise.out_channels == conv.in_channels * full
    assert (pair.depthwise.stride, pair.depthwise.dilation) == (conv.stride, conv.dilation)
    x = torch.randn(2, conv.in_channels, 11, 13)
    with torch.no_grad():
        assert torch.allclose(pair(x), conv(x), atol=1e-5, rtol=0)
    assert fit_error(conv.weight, full) == pytest.approx(0.0, abs=1e-7)


def test_fit_error_falls_with_multiplier_and_matches_the_reconstruction():
    torch.manual_seed(0)
    weight = torch.randn(16, 4, 3, 3)
    errors = [fit_error(weight, m) for m in range(1, 10)]
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[0] > 0.3 and errors[-1] < 1e-7
    for m in (1, 3, 5):
        d, p = separable_factors(weight, m)
        direct = float((weight - reconstruct(d, p, 4)).norm() / weight.norm())
        assert direct == pytest.approx(fit_error(weight, m), rel=1e-4)


def test_fit_beats_a_random_rank_m_factorisation():
    """Eckart-Young: no rank-m factor pair fits better than the truncated SVD."""
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3)
    d, p = separable_factors(weight, 2)
    best = (weight - reconstruct(d, p, 3)).norm()
    for _ in range(5):
        d2 = d + 0.05 * torch.randn_like(d)
        p2 = p + 0.05 * torch.randn_like(p)
        assert (weight - reconstruct(d2, p2, 3)).norm() > best


def test_multiplier_past_the_rank_pads_with_zeros():
    weight = torch.randn(2, 3, 3, 3)  # rank of each (2, 9) slice <= 2
    d, p = separable_factors(weight, 4)
    assert d.shape == (12, 1, 3, 3) and p.shape == (2, 12, 1, 1)
    assert torch.allclose(reconstruct(d, p, 3), weight, atol=1e-6)


def test_cost_and_skip_reasons():
    assert separable_cost(8, 16, (3, 3), 1) == (1152, 8 * 9 + 16 * 8)
    assert skip_reason(nn.Conv2d(8, 8, 3, groups=8), 1) == "groups=8 (already grouped/depthwise)"
    assert skip_reason(nn.Conv2d(8, 8, 1), 1) == "1x1 kernel (already pointwise)"
    assert skip_reason(nn.Conv2d(4, 1, 3), 1) == "the pair would have 40 weights, not fewer than 36"
    assert skip_reason(nn.Conv2d(8, 16, 3), 1) is None


class Mixed(nn.Module):
    """A k×k conv, a depthwise conv, a 1×1 conv and a conv the pair would not shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.full = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 4, 1)
        self.tiny = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiny(self.pointwise(self.depthwise(self.full(x))))


def test_report_and_skips_are_recorded():
    model, ctx = Mixed(), Context(example_inputs=torch.randn(1, 1, 8, 8))
    weight = model.full.weight.detach().clone()
    apply_separable(model, SeparableConfig(multiplier=2), ctx)
    assert isinstance(model.full, DepthwiseSeparable) and isinstance(model.tiny, nn.Conv2d)
    layer = ctx.reports["layers"]["full"]
    assert layer["params_before"] == 8 * 9 + 8 and layer["params_after"] == 2 * 9 + 8 * 2 + 8
    assert layer["flops_before"] == 2 * 72 * 64 and layer["flops_after"] == 2 * 34 * 64
    assert layer["fit_error"] == pytest.approx(fit_error(weight, 2), abs=1e-6)
    assert 0 < layer["fit_error"] < 1
    assert set(ctx.reports["skipped"]) == {"depthwise", "pointwise", "tiny"}


def test_convnet_replaced_and_reloaded(tmp_path, digits):
    net = tiny_convnet()
    result = mp.compress(net, [{"technique": "architecture.separable", "multiplier": 2}],
                         data=digits, latency_runs=0)  # fmt: skip
    model = result.model
    assert isinstance(model.conv1, DepthwiseSeparable) and isinstance(
        model.conv2, DepthwiseSeparable
    )
    assert result.stages[0].learned["layers"]["conv2"]["params_after"] == 8 * 2 * 9 + 16 * 16 + 16
    loaded = mp.load(result.save(tmp_path / "sep"))
    x = digits.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.conv2, DepthwiseSeparable)


# ---------------------------------------------------------------------------------- errors


def test_only_unreplaceable_convs_is_an_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    with pytest.raises(UnsupportedModuleError, match="no selected conv can be replaced; e.g. 0: "
                       r"groups=4 \(already grouped/depthwise\)"):  # fmt: skip
        apply_separable(model, SeparableConfig(), Context())


def test_masked_conv_is_refused_before_any_change(digits):
    net = tiny_convnet()
    stages = [{"technique": "prune.magnitude", "sparsity": 0.5, "targets": ["conv2"]},
              {"technique": "architecture.separable"}]  # fmt: skip
    with pytest.raises(UnsupportedModuleError, match="conv2: carries a mask or quantizer"):
        mp.compress(net, stages, data=digits, latency_runs=0)


def test_targeting_a_linear_is_refused():
    with pytest.raises(UnsupportedModuleError, match="fc: Linear is not supported by architec"):
        apply_separable(tiny_convnet(), SeparableConfig(targets=["fc"]), Context())


def test_no_conv_at_all(mlp):
    with pytest.raises(NoMatchingModulesError, match="architecture.separable"):
        apply_separable(mlp, SeparableConfig(), Context())


# ------------------------------------------------------------------- the intended recipe


@pytest.mark.skipif("distill.kd" not in technique_names(), reason="distill.kd not registered")
def test_distillation_recovers_most_of_the_lost_accuracy(digits):
    teacher = tiny_convnet()
    train_model(teacher, digits, epochs=10, lr=1e-2, seed=0)
    evaluate = accuracy_evaluator(digits.loader("test", 512))
    acc = evaluate(teacher)["accuracy"]
    sep = mp.compress(teacher, [{"technique": "architecture.separable"}], data=digits,
                      latency_runs=0).model  # fmt: skip
    lost = evaluate(sep)["accuracy"]
    stages = [{"technique": "architecture.separable"},
              {"technique": "distill.kd", "temperature": 4.0, "alpha": 0.9},
              {"technique": "train", "epochs": 4, "lr": 1e-2}]  # fmt: skip
    student = mp.compress(teacher, stages, data=digits, latency_runs=0, seed=0).model
    recovered = evaluate(student)["accuracy"]
    assert acc - lost > 0.3  # the low-rank init alone loses a lot ...
    assert recovered - lost >= 0.6 * (acc - lost)  # ... and distillation wins most of it back
