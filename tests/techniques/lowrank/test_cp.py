"""lowrank.cp: CP maths (exact recovery, balance, costs), ranks, budgets, artifacts and errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.measure import count_flops
from modelpress.techniques.lowrank.conv_select import geometry
from modelpress.techniques.lowrank.cp import (
    CPConfig,
    CPConv,
    apply_cp,
    balance,
    break_even_rank,
    cp_cost,
    cp_factors,
    cp_kernel,
    cp_layer,
    term_norm_ratio,
)
from modelpress.techniques.lowrank.layer_cost import relative_error
from modelpress.testing import tiny_convnet

CONVS = {
    "stride2": lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1),
    "rect-strided-dilated": lambda: nn.Conv2d(4, 6, (3, 5), (2, 1), (2, 1), dilation=(1, 2)),
    "reflect-nobias": lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False, padding_mode="reflect"),
    "same": lambda: nn.Conv2d(6, 4, 5, padding="same"),
}


def rank_three(conv: nn.Conv2d, seed: int = 0) -> nn.Conv2d:
    """``conv`` with its kernel replaced by an exact rank-3 CP tensor."""
    g = torch.Generator().manual_seed(seed)
    c_out, c_in, kh, kw = conv.weight.shape
    a = [torch.randn(n, 3, generator=g) for n in (c_out, c_in, kh, kw)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,yr,xr->oiyx", *a))
    return conv


def cp(model: nn.Module, data=None, **params) -> mp.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "slower on this runtime"
        return mp.compress(model, [{"technique": "lowrank.cp", **params}], data=data,
                           latency_runs=0)  # fmt: skip


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_a_rank_three_kernel_is_recovered_and_the_four_convs_reproduce_the_conv(kind):
    torch.manual_seed(0)
    conv = rank_three(CONVS[kind]())
    layer = cp_layer(conv, 3, n_iter=300, l2_reg=0.0)
    assert layer.vertical.groups == layer.horizontal.groups == 3
    assert relative_error(conv.weight, layer.weight) < 1e-5
    x = torch.randn(2, conv.in_channels, 11, 13)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-4, rtol=0)


def test_generic_kernel_at_rank_c_in_kh_kw_is_fitted_closely():
    # An exact CP of rank C_in·kh·kw always exists (one term per input tap); ALS gets close,
    # not exact: the tolerance is 1e-3 of ||K||, and falls with the rank.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    errors = [relative_error(conv.weight, cp_kernel(*cp_factors(conv.weight, r, n_iter=60, l2_reg=0.0)))
              for r in (4, 8, 27)]  # fmt: skip
    assert errors[2] < 1e-3 and errors == sorted(errors, reverse=True) and errors[0] > 0.1


def test_the_ridge_stops_degenerate_cancelling_terms_at_no_loss_of_fit():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3)
    plain, ridge = (cp_layer(conv, 30, n_iter=50, l2_reg=reg) for reg in (0.0, 1e-3))
    assert term_norm_ratio(conv.weight, plain) > 2.0  # terms 2x larger than K, cancelling
    assert term_norm_ratio(conv.weight, ridge) < 1.5
    assert (
        relative_error(conv.weight, ridge.weight) < relative_error(conv.weight, plain.weight) + 0.01
    )


def test_balance_keeps_the_tensor_and_equalizes_the_factors():
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(n, 5, generator=g, dtype=torch.float64) * s
               for n, s in ((6, 100.0), (4, 0.01), (3, 1.0))]  # fmt: skip
    weights = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    out = balance(weights, factors)
    before = torch.einsum("r,ir,jr,kr->ijk", weights, *factors)
    assert torch.allclose(torch.einsum("ir,jr,kr->ijk", *out), before, atol=1e-10)
    norms = torch.stack([f.norm(dim=0) for f in out])  # (3, 5)
    assert torch.allclose(norms, norms[:1].expand_as(norms), rtol=1e-10)


def test_same_seed_same_layers():
    conv = nn.Conv2d(6, 8, 3)
    a = cp_factors(conv.weight, 10, n_iter=20, init="random", seed=3)
    b = cp_factors(conv.weight, 10, n_iter=20, init="random", seed=3)
    c = cp_factors(conv.weight, 10, n_iter=20, init="random", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_cost_matches_the_flop_counter_and_break_even():
    conv = nn.Conv2d(16, 24, (3, 5), stride=(2, 1), padding=(1, 2))
    x = torch.randn(1, 16, 10, 12)
    g = geometry(conv, (tuple(x.shape), tuple(conv(x).shape)))
    macs, params = cp_cost(g, 7)
    assert 2 * macs == count_flops(CPConv(conv, 7), x)  # 1x1 at 10x12, kh x 1 out 5x12, ...
    assert params == sum(p.numel() for p in CPConv(conv, 7).parameters()) - 24
    assert cp_cost(g, 1)[0] * break_even_rank(g) == pytest.approx(g.dense_macs())


# ------------------------------------------------------------------ on models: rules and reports


def test_default_rule_report_and_artifact_round_trip(digits, tmp_path):
    model = tiny_convnet()
    result = cp(model, digits)  # rank_ratio 0.5 of the break-even rank
    layers = result.stages[0].learned["layers"]
    assert {n: r["rank"] for n, r in layers.items()} == {"conv1": 2, "conv2": 19}
    rec = layers["conv2"]  # break-even 1152 / (8 + 3 + 3 + 16) = 38.4
    assert rec["params_after"] == 19 * (8 + 3 + 3 + 16) + 16
    assert rec["flops_after"] / rec["flops_before"] == pytest.approx(19 / 38.4)
    assert rec["fit_error"] == pytest.approx(
        relative_error(model.conv2.weight, result.model.conv2.weight), abs=1e-6)  # fmt: skip
    assert {"ms_before", "ms_after", "speedup"} <= set(rec)
    assert rec["term_norm_ratio"] == pytest.approx(
        term_norm_ratio(model.conv2.weight, result.model.conv2), abs=1e-4)  # fmt: skip
    x = digits.test.tensors[0][:32]
    path = result.save(tmp_path / "cp")
    edits = json.loads((path / "manifest.json").read_text())["edits"]
    assert {"op": "cp_conv", "layers": {"conv1": 2, "conv2": 19}} in edits
    assert torch.equal(outputs(mp.load(path), x), outputs(result.model, x))


def test_flops_budget_is_met_on_the_measured_flops(digits):
    model = tiny_convnet()
    result = cp(model, digits, flops_ratio=0.3, round_to=2)
    learned = result.stages[0].learned
    layers = learned["layers"]
    assert all(r["rank"] % 2 == 0 for r in layers.values())
    dense = sum(r["flops_before"] for r in layers.values())
    after = sum(r["flops_after"] for r in layers.values())
    kept = after / dense
    assert kept == pytest.approx(learned["flops_kept_predicted"], abs=1e-4) and 0.2 < kept <= 0.3
    x = digits.test.tensors[0][:1]
    assert count_flops(model, x) - count_flops(result.model, x) == dense - after


def test_explicit_rank_and_the_layer_it_leaves_alone():
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        apply_cp(tiny_convnet(), CPConfig(rank=8), ctx)
    assert ctx.reports["skipped"]["conv1"] == ("not cheaper: at rank 8 it would cost 7680 MACs, "
                                               "not fewer than 4608")  # fmt: skip
    assert ctx.reports["layers"]["conv2"]["rank"] == 8


# ----------------------------------------------------------------------------------- errors


def test_config_and_input_errors(digits):
    with pytest.raises(ConfigError, match="set one rank rule, not 'rank_ratio' and 'rank'"):
        mp.compress(tiny_convnet(), [{"technique": "lowrank.cp", "rank_ratio": 0.3, "rank": 4}])
    with pytest.raises(DataError, match="lowrank.cp with 'flops_ratio' needs example inputs"):
        apply_cp(tiny_convnet(), CPConfig(flops_ratio=0.5), Context())
    masked = mp.compress(tiny_convnet(), [{"technique": "quant.rtn", "bits": 4, "group_size": 8}],
                         data=digits, latency_runs=0).model  # fmt: skip
    before = copy.deepcopy(masked.state_dict())
    with pytest.raises(UnsupportedModuleError, match=r"^conv1: carries a mask or quantizer; run "
                       "lowrank.cp before"):  # fmt: skip
        apply_cp(masked, CPConfig(), Context())
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(
        UnsupportedModuleError, match=r"^0: groups=4 .* not supported by lowrank.cp"
    ):
        apply_cp(grouped, CPConfig(targets=["0"]), Context())
    with pytest.raises(UnsupportedModuleError, match="^lowrank.cp: no selected conv can be "
                       "factorized; e.g. 0: groups=4"):  # fmt: skip
        apply_cp(grouped, CPConfig(), Context())
