"""quant.gptq: beats RTN on correlated inputs, exact grid, act-order, masks kept, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.context import Context
from modelpress.errors import UnsupportedModuleError
from modelpress.layerwise import Hessian
from modelpress.parametrizations import effective_tensor, find_parametrization
from modelpress.techniques.pruning.mask import Mask
from modelpress.techniques.quantization.affine import GroupLayout, compute_qparams
from modelpress.techniques.quantization.gptq import (
    GPTQConfig,
    GroupFit,
    apply_gptq,
    column_grid,
    gptq_quantize,
    pack_blocks,
    walk_order,
)


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    return torch.randn(n, cols, generator=g) @ mix + 0.1 * torch.randn(n, cols, generator=g)


def _grid(w: torch.Tensor, bits: int, group_size: int | None):
    layout = GroupLayout(tuple(w.shape), "group" if group_size else "channel", group_size)
    scale, zero = compute_qparams(layout.to_groups(w), bits, symmetric=False)
    return layout, scale, zero, *column_grid(layout, scale, zero)


def _rtn(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1) - z) * s


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(3, None, False), (4, 16, True)])
def test_gptq_reconstructs_better_than_rtn(bits, group_size, act_order):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = _correlated_inputs(512, 64)
    h = Hessian(64)
    h.update(x)
    _, _, _, s, z = _grid(w, bits, group_size)
    q, _, _ = gptq_quantize(w, h.matrix, bits, (s, z), blocksize=16, act_order=act_order)
    err_gptq = (x @ (w - q).T).norm()
    err_rtn = (x @ (w - _rtn(w, s, z, bits)).T).norm()
    assert err_gptq < 0.8 * err_rtn  # measured 0.75 (3-bit channel), lower with groups
    assert torch.equal(_rtn(q, s, z, bits), q)  # on the grid: quantizing again changes nothing


@pytest.mark.parametrize("act_order", [False, True])
def test_dynamic_groups_fit_the_compensated_weights(act_order):
    torch.manual_seed(0)
    w, x = torch.randn(24, 64), _correlated_inputs(512, 64)
    h = Hessian(64)
    h.update(x)
    _, _, _, s, z = _grid(w, 3, 16)
    fit = GroupFit(16, GPTQConfig(bits=3, group_size=16))
    static, _, _ = gptq_quantize(w, h.matrix, 3, (s, z), blocksize=24, act_order=act_order)
    q, s2, z2 = gptq_quantize(w, h.matrix, 3, fit, blocksize=24, act_order=act_order)
    # one grid per group, and the weights sit on it
    per_group = s2.reshape(24, 4, 16)
    assert torch.equal(per_group, per_group[:, :, :1].expand(-1, -1, 16))
    assert torch.equal(_rtn(q, s2, z2, 3), q)
    err = {k: float((x @ (w - v).T).norm()) for k, v in {"static": static, "dynamic": q}.items()}
    if not act_order:  # measured 0.95; with act-order 1.00 here (0.96-1.03 over seeds)
        assert err["dynamic"] < 0.97 * err["static"]


def test_group_act_order_keeps_groups_together():
    diag = torch.tensor([1.0, 9.0, 2.0, 3.0, 8.0, 0.5, 7.0])
    order, lengths = walk_order(diag, 3, act_order=True)
    assert order.tolist() == [1, 2, 0, 4, 3, 5, 6] and lengths == [3, 3, 1]
    assert walk_order(diag, 1, act_order=True)[0].tolist() == [1, 4, 6, 3, 2, 0, 5]
    assert walk_order(diag, 3, act_order=False)[0].tolist() == list(range(7))
    assert pack_blocks([3, 3, 1], 4) == [(0, 3), (3, 7)]
    assert pack_blocks([5, 1], 4) == [(0, 5), (5, 6)]


def _output_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - dense(x)) ** 2).mean())


def test_clip_search_lowers_the_output_error_of_heavy_tailed_weights():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():  # a few outliers stretch the min-max ranges
        for layer in (dense[0], dense[2]):
            layer.weight.copy_(torch.distributions.StudentT(2.0).sample(layer.weight.shape) / 8)
    x = _correlated_inputs(512, 64)
    ctx = Context(batches=[(x[:256], None), (x[256:], None)])
    errors = {}
    for clip in (False, True):
        cfg = GPTQConfig(bits=3, group_size=16, n_samples=512, clip=clip)
        errors[clip] = _output_error(apply_gptq(copy.deepcopy(dense), cfg, ctx), dense, x)
    assert errors[True] < 0.97 * errors[False]  # measured 0.94


def test_asymmetric_calibration_undoes_the_drift_of_earlier_layers():
    torch.manual_seed(0)
    dense = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.Tanh())])
    x = _correlated_inputs(2048, 32)
    calib, held_out = x[:1024], x[1024:]
    ctx = Context(batches=[(calib[:512], None), (calib[512:], None)])
    errors = {}
    for asymmetric in (False, True):
        cfg = GPTQConfig(bits=3, group_size=16, n_samples=1024, sequential=True,
                         asymmetric=asymmetric)  # fmt: skip
        quantized = apply_gptq(copy.deepcopy(dense), cfg, ctx)
        errors[asymmetric] = _output_error(quantized, dense, held_out)
    assert errors[True] < 0.6 * errors[False]  # measured 0.31


def test_pruned_weights_stay_zero():
    w = torch.randn(8, 32)
    pruned = torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    h = Hessian(32)
    h.update(_correlated_inputs(128, 32))
    _, _, _, s, z = _grid(w, 4, None)
    q, _, _ = gptq_quantize(w, h.matrix, 4, (s, z), pruned=pruned)
    assert torch.all(q[pruned] == 0)


def test_on_a_trained_mlp_and_reload(mlp, digits, tmp_path):
    recipe = [{"technique": "quant.gptq", "bits": 2, "n_samples": 128}]
    gptq = mp.compress(mlp, recipe, data=digits, latency_runs=0)
    rtn = mp.compress(mlp, [{"technique": "quant.rtn", "bits": 2}], data=digits, latency_runs=0)
    # measured 0.961 (dense 0.961) vs 0.933 at 2 bits; at 3-4 bits both sit at the dense accuracy
    assert gptq.final["eval"]["accuracy"] > rtn.final["eval"]["accuracy"] + 0.01
    loaded = mp.load(gptq.save(tmp_path / "g"))
    x = digits.test.tensors[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gptq.model.eval()(x), rtol=0, atol=0)
    assert gptq.final["bytes"] < 0.2 * gptq.baseline["bytes"]


def test_after_pruning_the_mask_holds(mlp, digits):
    recipe = [
        {"technique": "prune.magnitude", "sparsity": 0.5},
        {"technique": "quant.gptq", "bits": 4, "group_size": 16, "act_order": True},
    ]
    result = mp.compress(mlp, recipe, data=digits, latency_runs=0)
    fc1 = result.model.fc1
    mask = find_parametrization(fc1, "weight", Mask).mask
    assert torch.all(effective_tensor(fc1)[~mask] == 0) and not mask.all()


def test_conv_layers(digits):
    from modelpress.testing import tiny_convnet

    model = tiny_convnet()
    ctx = Context(batches=[(digits.train.tensors[0][:64], None)])
    quantized = apply_gptq(copy.deepcopy(model), GPTQConfig(bits=4, n_samples=64), ctx)
    assert quantized.conv2.parametrizations.weight[0].bits == 4


def test_quantizing_twice_is_refused(mlp, digits):
    first = mp.compress(mlp, [{"technique": "quant.rtn", "bits": 8}], latency_runs=0).model
    ctx = Context(batches=[(digits.train.tensors[0][:16], None)])
    with pytest.raises(UnsupportedModuleError, match="already quantized"):
        apply_gptq(first, GPTQConfig(bits=4), ctx)


def test_grouped_conv_is_refused_before_any_change():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 36, 2))
    before = copy.deepcopy(model.state_dict())
    ctx = Context(batches=[torch.randn(4, 4, 8, 8)])
    with pytest.raises(UnsupportedModuleError, match="0"):
        apply_gptq(model, GPTQConfig(bits=4), ctx)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
