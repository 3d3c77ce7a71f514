"""quant.hqq: lower weight and output error than RTN, fp16 zero points stored exactly, errors."""

from __future__ import annotations

import pytest
import torch

import modelpress as mp
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.techniques.quantization.affine import GroupLayout
from modelpress.techniques.quantization.fake_quant import AffineFakeQuant
from modelpress.techniques.quantization.hqq import (
    HQQConfig,
    hqq_init,
    hqq_quantizer,
    hqq_zero,
    shrink_lp,
)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    grid = {"symmetric": False, "granularity": "group", "scale_dtype": "float16"}
    return AffineFakeQuant(w, bits, group_size=group_size, **grid)(w)


def test_shrink_is_the_lp_soft_threshold():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    out = shrink_lp(x, beta=10.0, p=0.7)
    # |x| - |x|^(p-1) / beta: 2 - 2^-0.3 / 10 = 1.9188; small values are cut to 0
    expected = torch.tensor([-1.91877, 0.0, 0.0, 0.0, 1.91877])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # a huge penalty keeps everything
    torch.testing.assert_close(shrink_lp(x, beta=1e9, p=0.7), x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("round_zero", [True, False])
def test_weight_error_below_rtn(bits, round_zero):
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(bits)) * 0.02
    fq = hqq_quantizer(w, HQQConfig(bits=bits, group_size=64, round_zero=round_zero))
    err_hqq, err_rtn = w - fq(w), w - rtn(w, bits, 64)
    assert err_hqq.norm() < 0.97 * err_rtn.norm()  # measured 0.94-0.95x
    assert fq.float_zero and torch.equal(fq.zero_point, fq.zero_point.half().float())
    if round_zero:  # started from RTN's grid: no group ends worse by mean |error|
        per_group = GroupLayout(tuple(w.shape), "group", 64).to_groups
        l1_hqq, l1_rtn = per_group(err_hqq).abs().mean(1), per_group(err_rtn).abs().mean(1)
        assert torch.all(l1_hqq <= l1_rtn) and l1_hqq.mean() < 0.97 * l1_rtn.mean()


def test_each_group_keeps_its_best_zero():
    g = torch.Generator().manual_seed(0)
    groups = torch.randn(200, 32, generator=g)
    valid = torch.ones_like(groups, dtype=torch.bool)
    scale, zero0 = hqq_init(groups, valid, 3)

    def err(z):
        codes = torch.clamp(torch.round(groups / scale[:, None] + z[:, None]), 0, 7)
        return ((codes - z[:, None]) * scale[:, None] - groups).abs().mean(1)

    zero = hqq_zero(groups, valid, scale, zero0, 3, iterations=50)
    assert torch.all(err(zero) <= err(zero0.half().float()))


def test_padding_and_constant_groups():
    w = torch.cat([torch.full((2, 5), 3.0), torch.randn(2, 5)])  # 5 columns: short groups
    fq = hqq_quantizer(w, HQQConfig(bits=4, group_size=4))
    assert torch.isfinite(fq.zero_point).all() and fq.zero_point.abs().max() <= 30
    torch.testing.assert_close(fq(w)[:2], w[:2], rtol=0, atol=1e-3)  # constants exactly-ish
    assert (w - fq(w))[2:].abs().max() <= fq.scale.max()


@pytest.mark.parametrize("bits", [3, 4])
def test_on_the_digits_mlp_output_error_below_rtn_and_reload(mlp, digits, tmp_path, bits):
    x = digits.test.tensors[0]
    with torch.no_grad():
        ref = mlp.eval()(x)
    results = {
        name: mp.compress(
            mlp, [{"technique": name, "bits": bits, "group_size": 64}], latency_runs=0
        )
        for name in ("quant.hqq", "quant.rtn")
    }
    with torch.no_grad():
        errors = {k: float((r.model.eval()(x) - ref).pow(2).mean()) for k, r in results.items()}
    assert errors["quant.hqq"] < 0.85 * errors["quant.rtn"]  # measured 0.76x (3), 0.39x (4)
    hqq = results["quant.hqq"]
    path = hqq.save(tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(mp.load(path)(x), hqq.model(x), rtol=0, atol=0)
    assert hqq.final["bytes"] < 0.25 * hqq.baseline["bytes"]


def test_symmetric_is_refused():
    with pytest.raises(ConfigError, match="'symmetric' must be false"):
        mp.compress(torch.nn.Linear(4, 4), [{"technique": "quant.hqq", "symmetric": True}])


def test_pruned_weights_are_refused(mlp, digits):
    recipe = [{"technique": "prune.magnitude", "sparsity": 0.5}, {"technique": "quant.hqq"}]
    with pytest.raises(UnsupportedModuleError, match="fc1: pruned by an earlier stage"):
        mp.compress(mlp, recipe, data=digits, latency_runs=0)


def test_quantizing_twice_is_refused(mlp):
    stages = [{"technique": "quant.rtn"}, {"technique": "quant.hqq"}]
    with pytest.raises(UnsupportedModuleError, match="fc1: already quantized"):
        mp.compress(mlp, stages, latency_runs=0)
