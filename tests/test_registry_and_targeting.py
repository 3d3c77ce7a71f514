"""The registry (names, suggestions) and module selection (targets / ignore)."""

from __future__ import annotations

import pytest
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.errors import NoMatchingModulesError, UnknownNameError, UnsupportedModuleError
from modelpress.registry import get_technique, technique_names
from modelpress.targeting import select_modules, select_weighted


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Sequential(nn.Linear(4, 2))


def test_builtins_are_registered_with_needs():
    assert {"prune.magnitude", "quant.rtn", "train"} <= set(technique_names())
    assert get_technique("train").needs == {"training"}
    assert get_technique("quant.rtn").needs == frozenset()


def test_unknown_technique_suggests():
    with pytest.raises(UnknownNameError, match=r"did you mean 'prune.magnitude'"):
        get_technique("prune.magnitud")


def names(picked):
    return [n for n, _ in picked]


def test_select_by_type_name_regex_and_ignore():
    net = Net()
    assert names(select_modules(net, ["Linear"], owner="t")) == ["fc1", "fc2", "head.0"]
    assert names(select_modules(net, ["re:fc\\d"], owner="t")) == ["fc1", "fc2"]
    assert names(select_modules(net, ["Linear"], ["head.0"], owner="t")) == ["fc1", "fc2"]
    assert names(select_modules(net, ["norm"], owner="t")) == ["norm"]


def test_selector_matching_nothing_names_it_and_some_modules():
    with pytest.raises(
        NoMatchingModulesError,
        match=r"t: target selector 'fc9' matched no module; modules include: fc1",
    ):
        select_modules(Net(), ["fc9", "fc1"], owner="t")
    with pytest.raises(NoMatchingModulesError, match="ignore selector 'nope'"):
        select_modules(Net(), ["Linear"], ["nope"], owner="t")
    with pytest.raises(NoMatchingModulesError, match="select no module"):
        select_modules(Net(), ["fc1"], ["fc1"], owner="t")


def test_default_targets_are_lenient_but_user_targets_strict():
    default = TargetedConfig()  # Linear, Conv1d, Conv2d, Conv3d: no conv here, still fine
    assert names(select_weighted(Net(), default, owner="t", supported=(nn.Linear,))) == [
        "fc1",
        "fc2",
        "head.0",
    ]
    strict = TargetedConfig(targets=["Linear", "Conv2d"])
    with pytest.raises(NoMatchingModulesError, match="'Conv2d'"):
        select_weighted(Net(), strict, owner="t", supported=(nn.Linear,))


def test_unsupported_leaf_is_named():
    cfg = TargetedConfig(targets=["norm"])
    with pytest.raises(UnsupportedModuleError, match=r"norm: LayerNorm is not supported by t"):
        select_weighted(Net(), cfg, owner="t", supported=(nn.Linear,))


def test_container_selected_yields_its_supported_children():
    cfg = TargetedConfig(targets=["re:head.*"])
    assert names(select_weighted(Net(), cfg, owner="t", supported=(nn.Linear,))) == ["head.0"]
