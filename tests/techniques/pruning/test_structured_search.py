"""The EagleEye allocation search of ``prune.structured``: adaptive BN, the budget, the choice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError
from modelpress.measure.flops import count_flops
from modelpress.techniques.pruning.structured.apply import StructuredConfig, apply_structured
from modelpress.techniques.pruning.structured.search import mean_loss, recalibrate_batchnorm


def batches(n: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]  # fmt: skip


def test_adaptive_bn_re_estimates_the_statistics_as_the_average_over_batches():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    data = batches(2)
    recalibrate_batchnorm(model, data)
    conv, norm = model[0], model[1]
    with torch.no_grad():
        stats = [conv(x) for x, _ in data]
    means = torch.stack([y.mean((0, 2, 3)) for y in stats])
    variances = torch.stack([y.var((0, 2, 3), unbiased=True) for y in stats])
    assert torch.allclose(norm.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, variances.mean(0), atol=1e-5)
    assert norm.momentum == 0.1 and not model.training  # restored; eval mode
    assert int(norm.num_batches_tracked) == 2


def test_search_keeps_the_lowest_loss_allocation_within_the_budget():
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    data = batches(4)
    cfg = StructuredConfig(flops_target=0.5, scope="global", importance="l2", round_to=4,
                           search_candidates=4, search_batches=2)  # fmt: skip
    ctx = Context(example_inputs=x, batches=data)
    pruned = apply_structured(copy.deepcopy(model), cfg, ctx)
    report = ctx.reports["search"]
    losses = report["losses"]
    assert report["candidates"] == 5 and len(losses) == 5
    assert report["loss_chosen"] == min(v for v in losses if v is not None)  # None: no fit
    assert report["loss_chosen"] == losses[report["chosen"]] <= losses[0]
    kept = count_flops(pruned, x) / count_flops(model, x)
    assert kept <= 0.5 and ctx.reports["flops_kept_predicted"] == pytest.approx(kept, abs=0.01)
    # the model returned is the one scored: its BatchNorm statistics re-estimated
    assert mean_loss(pruned, data[2:], ctx.loss_fn) == pytest.approx(report["loss_chosen"], 1e-4)
    again = apply_structured(copy.deepcopy(model), cfg, Context(example_inputs=x, batches=data))
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [m.out_channels for m in again.modules() if isinstance(m, nn.Conv2d)]


def test_the_search_is_replayed_on_load(tmp_path):
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    stage = mp.Stage.of("prune.structured", flops_target=0.6, scope="global",
                        search_candidates=2, search_batches=1)  # fmt: skip
    result = mp.compress(model, [stage], data=batches(2), example_inputs=torch.randn(1, 3, 32, 32))
    loaded = mp.load(result.save(tmp_path / "a")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.model.eval()(x), atol=1e-5)


def test_search_without_a_flops_target_or_data_is_refused():
    with pytest.raises(ConfigError, match="search_candidates .* set flops_target"):
        parse_config(StructuredConfig, {"search_candidates": 4}, owner="prune.structured")
    model = mp.load_model("zoo:resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    cfg = StructuredConfig(flops_target=0.5, search_candidates=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataError, match="search_candidates needs labelled data"):
        apply_structured(model, cfg, Context(example_inputs=torch.randn(1, 3, 32, 32)))
    with pytest.raises(DataError, match="2 training batches or more"):
        apply_structured(model, cfg, Context(example_inputs=torch.randn(1, 3, 32, 32),
                                             batches=batches(1)))  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
