"""lowrank.tucker: Tucker-2 maths, VBMF ranks, budgets, reports, artifacts and errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.measure import count_flops
from modelpress.techniques.lowrank import layer_cost
from modelpress.techniques.lowrank.conv_select import ConvGeometry, geometry
from modelpress.techniques.lowrank.layer_cost import LayerCost, relative_error
from modelpress.techniques.lowrank.tucker import (
    Tucker2Conv,
    TuckerConfig,
    apply_tucker,
    tucker2_cost,
    tucker2_factors,
    tucker2_kernel,
    tucker2_layer,
    vbmf_ranks,
)
from modelpress.testing import tiny_convnet

CONVS = {
    "stride2": lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1),
    "rect-dilated": lambda: nn.Conv2d(4, 6, (3, 5), padding=(2, 1), dilation=2),
    "reflect-nobias": lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False, padding_mode="reflect"),
    "same": lambda: nn.Conv2d(6, 4, 5, padding="same"),
}


class ThreeConvs(nn.Module):
    """Three 3×3 convs (one strided) on ``(B, 1, 8, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def three_convs() -> nn.Module:
    torch.manual_seed(0)
    return ThreeConvs().eval()


def tucker(model: nn.Module, data=None, stages=(), **params) -> mp.Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "slower on this runtime"
        recipe = [{"technique": "lowrank.tucker", **params}, *stages]
        return mp.compress(model, recipe, data=data, latency_runs=0)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_full_rank_reproduces_the_conv(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    layer = tucker2_layer(conv, conv.in_channels, conv.out_channels)
    assert (layer.core.stride, layer.core.padding, layer.core.dilation) == (
        conv.stride, conv.padding, conv.dilation)  # fmt: skip
    x = torch.randn(2, conv.in_channels, 11, 13)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-4, rtol=0)
    assert relative_error(conv.weight, layer.weight) < 1e-6


def test_fit_matches_eckart_young_and_the_hosvd_bound():
    torch.manual_seed(0)
    w = torch.randn(12, 10, 3, 3, dtype=torch.float64)
    first, core, last = tucker2_factors(w, 10, 5)  # full R_in: truncated SVD of mode 0
    s2 = torch.linalg.svdvals(w.reshape(12, -1)).square()
    expected = float((s2[5:].sum() / s2.sum()).sqrt())
    assert relative_error(w, tucker2_kernel(first, core, last)) == pytest.approx(expected, 1e-8)
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(last[:, :, 0, 0].T @ last[:, :, 0, 0], eye, atol=1e-10)  # orthonormal
    # both modes truncated: HOOI does no worse than HOSVD's bound sum of discarded energies
    s2_in = torch.linalg.svdvals(w.transpose(0, 1).reshape(10, -1)).square()
    bound = float((s2[6:].sum() + s2_in[4:].sum()) / s2.sum())
    err = relative_error(w, tucker2_kernel(*tucker2_factors(w, 4, 6)))
    errors = [relative_error(w, tucker2_kernel(*tucker2_factors(w, r, r))) for r in (2, 4, 6, 8)]
    assert err**2 <= bound and errors == sorted(errors, reverse=True)


def test_cost_matches_the_flop_counter_on_a_strided_conv():
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    x = torch.randn(1, 16, 10, 10)
    layer = Tucker2Conv(conv, 6, 9)
    g = geometry(conv, (tuple(x.shape), tuple(conv(x).shape)))
    macs, params = tucker2_cost(g, 6, 9)
    assert 2 * macs == count_flops(layer, x)  # the first 1x1 runs at 10x10, the rest at 5x5
    assert 2 * g.dense_macs() == count_flops(conv, x)
    assert params == sum(p.numel() for p in layer.parameters()) - 24  # bias not counted


def test_vbmf_recovers_the_multilinear_ranks_of_a_noisy_kernel():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64) * 4
    u_out, _ = torch.linalg.qr(torch.randn(24, 5, generator=g, dtype=torch.float64))
    u_in, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    kernel = torch.einsum("oa,abyx,ib->oiyx", u_out, core, u_in)
    noisy = kernel + 0.02 * torch.randn(kernel.shape, generator=g, dtype=torch.float64)
    assert vbmf_ranks(noisy) == (3, 5)  # (R_in, R_out)
    assert vbmf_ranks(torch.randn(24, 20, 3, 3, generator=g)) == (1, 1)  # noise: nothing kept


# ------------------------------------------------------------------ on models: rules and reports


def test_rank_ratio_on_the_convnet_report_and_artifact_round_trip(digits, tmp_path):
    model = tiny_convnet()
    result = tucker(model, digits, rank_ratio=0.5)
    learned = result.stages[0].learned
    assert "skipped" not in learned  # conv1 at ranks (1, 4): 4,416 MACs per sample < 4,608
    assert (
        isinstance(result.model.conv1, Tucker2Conv) and learned["layers"]["conv1"]["rank_in"] == 1
    )
    rec = learned["layers"]["conv2"]
    assert (rec["rank_in"], rec["rank_out"]) == (4, 8)
    assert rec["params_before"] == 16 * 8 * 9 + 16
    assert rec["params_after"] == 8 * 4 + 4 * 8 * 9 + 8 * 16 + 16
    assert rec["flops_before"] == 2 * 16 * 8 * 9 * 64 and rec["flops_after"] == 2 * 64 * (
        8 * 4 + 4 * 8 * 9 + 8 * 16)  # fmt: skip
    assert {"ms_before", "ms_after", "speedup"} <= set(rec)
    assert rec["fit_error"] == pytest.approx(
        relative_error(model.conv2.weight, result.model.conv2.weight), abs=1e-6)  # fmt: skip
    x = digits.test.tensors[0][:32]
    path = result.save(tmp_path / "tucker")
    edits = json.loads((path / "manifest.json").read_text())["edits"]
    assert {"op": "tucker2", "layers": {"conv1": [1, 4], "conv2": [4, 8]}} in edits
    assert torch.equal(outputs(mp.load(path), x), outputs(result.model, x))


def test_vbmf_is_the_default_rule_and_round_to_rounds_up():
    model = three_convs()
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        apply_tucker(copy.deepcopy(model), TuckerConfig(ignore=["conv1"]), ctx)
        vbmf = {n: (r["rank_in"], r["rank_out"]) for n, r in ctx.reports["layers"].items()}
        assert vbmf == {n: vbmf_ranks(getattr(model, n).weight) for n in ("conv2", "conv3")}
        ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
        apply_tucker(copy.deepcopy(model), TuckerConfig(rank=5, round_to=4, ignore=["conv1"]), ctx)
    assert {(r["rank_in"], r["rank_out"]) for r in ctx.reports["layers"].values()} == {
        (8, 8)}  # fmt: skip


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_flops_budget_is_met_on_the_measured_flops(ratio):
    model = three_convs()
    x = torch.randn(1, 1, 8, 8)
    ctx = Context(example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = apply_tucker(copy.deepcopy(model), TuckerConfig(flops_ratio=ratio), ctx)
    layers, skipped = ctx.reports["layers"], ctx.reports.get("skipped", {})
    dense = {n: count_flops(getattr(model, n), x_n) for n, x_n in _conv_inputs(model, x).items()}
    after = sum(r["flops_after"] for r in layers.values()) + sum(dense[n] for n in skipped)
    assert after / sum(dense.values()) == pytest.approx(ctx.reports["flops_kept_predicted"], 1e-3)
    assert ratio - 0.1 < after / sum(dense.values()) <= ratio
    saved = sum(r["flops_before"] - r["flops_after"] for r in layers.values())
    assert count_flops(model, x) - count_flops(out, x) == saved


def _conv_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, args, out: seen.update({name: args[0]})  # returns None

    hooks = [getattr(model, n).register_forward_hook(keep(n)) for n in ("conv1", "conv2", "conv3")]
    outputs(model, x)
    for h in hooks:
        h.remove()
    return seen


def test_params_budget_needs_no_example_inputs():
    model = three_convs()
    ctx = Context()
    apply_tucker(copy.deepcopy(model), TuckerConfig(params_ratio=0.5), ctx)
    layers = ctx.reports["layers"]
    assert "flops_before" not in layers["conv2"]
    dense = {n: getattr(model, n).weight.numel() for n in ("conv1", "conv2", "conv3")}
    bias = {n: getattr(model, n).bias.numel() for n in dense}
    kept = sum(r["params_after"] - bias[n] for n, r in layers.items())
    kept += sum(dense[n] for n in ctx.reports.get("skipped", {}))
    assert kept / sum(dense.values()) <= 0.5


def test_slower_layers_are_warned_about_and_reported(monkeypatch):
    def slow(original, replacement, input_shape, **_):
        return LayerCost(flops_before=100, flops_after=50, ms_before=1.0, ms_after=2.0)

    monkeypatch.setattr(layer_cost, "compare_layer", slow)
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.warns(RuntimeWarning, match=r"lowrank.tucker: .* slower .* conv2 \(0.50x\)"):
        apply_tucker(three_convs(), TuckerConfig(rank_ratio=0.5), ctx)
    assert ctx.reports["slower"] == ["conv2", "conv3"]


def test_composes_with_quantization_entropy_coding_and_pruning(digits, tmp_path):
    stages = [{"technique": "quant.rtn", "bits": 4, "group_size": 8}, {"technique": "encode.ans"}]
    result = tucker(tiny_convnet(), digits, stages, rank_ratio=0.5)
    assert parametrize.is_parametrized(result.model.conv2.core)  # the factors are quantized
    x = digits.test.tensors[0][:32]
    assert torch.equal(outputs(mp.load(result.save(tmp_path / "q")), x), outputs(result.model, x))
    pruned = tucker(tiny_convnet(), digits, [{"technique": "prune.magnitude", "sparsity": 0.5}],
                    rank_ratio=0.5).model  # fmt: skip
    assert float((pruned.conv2.core.weight == 0).float().mean()) >= 0.4
    assert torch.equal(outputs(mp.load(mp.save(pruned, tmp_path / "p")), x), outputs(pruned, x))


# ----------------------------------------------------------------------------------- errors


def test_one_rank_rule_only():
    with pytest.raises(ConfigError, match="set one rank rule, not 'rank' and 'flops_ratio'"):
        mp.compress(tiny_convnet(), [{"technique": "lowrank.tucker", "rank": 2,
                                      "flops_ratio": 0.5}])  # fmt: skip


def test_masked_conv_is_refused_and_nothing_changes(digits):
    masked = mp.compress(tiny_convnet(), [{"technique": "prune.magnitude", "sparsity": 0.5}],
                         data=digits, latency_runs=0).model  # fmt: skip
    before = copy.deepcopy(masked.state_dict())
    with pytest.raises(UnsupportedModuleError, match=r"^conv2: carries a mask or quantizer"):
        apply_tucker(masked, TuckerConfig(rank_ratio=0.5, targets=["conv2"]), Context())
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())


def test_named_grouped_or_pointwise_convs_are_errors_else_skipped():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3))
    for name, why in (("0", "groups=2"), ("1", "1x1 kernel")):
        with pytest.raises(UnsupportedModuleError, match=rf"^{name}: {why}.* not supported by "
                           "lowrank.tucker; remove it from targets"):  # fmt: skip
            apply_tucker(copy.deepcopy(model), TuckerConfig(targets=[name], rank=2), Context())
    ctx = Context()
    apply_tucker(model, TuckerConfig(rank=2), ctx)
    assert set(ctx.reports["skipped"]) == {"0", "1"} and isinstance(model[2], Tucker2Conv)


def test_nothing_factorizable_is_one_error():
    with pytest.raises(UnsupportedModuleError, match=r"^lowrank.tucker: no selected conv can be "
                       r"factorized; e.g. conv1: not cheaper: at ranks \(1, 8\)"):  # fmt: skip
        apply_tucker(tiny_convnet(), TuckerConfig(rank=8, targets=["conv1"]), Context())


def test_budget_errors():
    with pytest.raises(DataError, match="'flops_ratio' needs example inputs"):
        apply_tucker(three_convs(), TuckerConfig(flops_ratio=0.5), Context())
    ctx = Context(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"The 'flops_ratio' parameter of lowrank.tucker must be "
                       r"at least 0\.\d+ .* Got 0.01 instead"):  # fmt: skip
        apply_tucker(three_convs(), TuckerConfig(flops_ratio=0.01), ctx)


def test_geometry_without_example_inputs_is_per_output_pixel():
    g = geometry(nn.Conv2d(4, 8, 3, stride=2), None)
    assert g == ConvGeometry(4, 8, 3, 3, 2, 2, 1, 1, True)
