"""``encode.huffman`` / ``encode.ans`` as recipe stages: config, reports, composition."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import modelpress as mp
from modelpress.artifact import load_artifact, save_artifact
from modelpress.artifact.packing import EntropyCoding, entropy_coding_of
from modelpress.config import parse_config
from modelpress.context import Context
from modelpress.errors import ConfigError
from modelpress.measure import directory_bytes
from modelpress.recipe import Recipe
from modelpress.registry import get_technique
from modelpress.techniques.encoding.entropy import AnsConfig

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return mp.load_model("zoo:lenet-300-100", input_shape=[1, 28, 28], num_classes=10)


def test_bad_payloads_choice_is_rejected_with_the_template() -> None:
    with pytest.raises(
        ConfigError,
        match=r"The 'payloads' parameter of encode\.ans must be one of 'all', 'values', "
        r"'indices'\. Got 'weights' instead\.",
    ):
        parse_config(AnsConfig, {"payloads": "weights"}, owner="encode.ans")


def test_both_stages_are_registered_and_need_no_data() -> None:
    for name in ("encode.huffman", "encode.ans"):
        spec = get_technique(name)
        assert spec.needs == frozenset() and "payloads" in spec.config_cls.model_fields


def test_a_recipe_from_yaml_marks_the_model_and_reports(lenet) -> None:
    recipe = Recipe.from_yaml(
        "version: 1\nname: coded\nstages:\n"
        "  - technique: encode.huffman\n  - technique: encode.ans\n    payloads: values\n"
    )
    result = mp.compress(lenet, recipe, latency_runs=0)
    assert entropy_coding_of(result.model) == EntropyCoding("ans", "values")
    assert entropy_coding_of(lenet) is None  # the input model is not marked
    assert result.stages[0].learned == {"coder": "huffman", "payloads": "all"}
    assert result.stages[1].learned == {
        "coder": "ans",
        "payloads": "values",
        "replaces": {"coder": "huffman", "payloads": "all"},
    }
    for stage in result.stages:  # weights untouched
        assert stage.metrics["nonzeros"] == result.baseline["nonzeros"]


STAGES = {
    # Deep Compression's pipeline: prune -> k-means codebook -> entropy coding
    "kmeans": [{"technique": "prune.magnitude", "sparsity": 0.9},
               {"technique": "share.kmeans", "bits": 5}],
    "nm": [{"technique": "prune.nm", "n": 2, "m": 4}, {"technique": "quant.rtn", "bits": 4}],
}  # fmt: skip


@pytest.fixture(scope="module")
def compressed(lenet, tmp_path_factory):
    """Each recipe's model and its plain artifact."""
    root = tmp_path_factory.mktemp("plain")
    out = {}
    for key, stages in STAGES.items():
        model = mp.compress(lenet, stages, latency_runs=0).model
        out[key] = (model, save_artifact(model, root / key))
    return out


@pytest.mark.parametrize("key", sorted(STAGES))
@pytest.mark.parametrize("coder", ["huffman", "ans"])
def test_entropy_coding_composes_with_pruning_sharing_and_quantization(
    compressed, tmp_path, key, coder
) -> None:
    model, plain_path = compressed[key]
    spec = get_technique(f"encode.{coder}")
    coded = spec.apply(copy.deepcopy(model), spec.config_cls(), Context())
    path = save_artifact(coded, tmp_path / coder)
    assert directory_bytes(path) < 0.95 * directory_bytes(plain_path)
    with torch.no_grad():
        assert torch.equal(load_artifact(path)(X), model.eval()(X))
    fc1 = json.loads((path / "manifest.json").read_text())["tensors"]["fc1.weight"]
    assert coder in (
        fc1.get("packing", {}).get("kind"),
        fc1["layout"].get("packing", {}).get("kind"),
    )
    if key == "nm" and coder == "ans":  # 6 subsets of 2 in 4: ~2.58 bits, not 3
        assert fc1["layout"]["format"] == "nm" and fc1["layout"]["packing"]["kind"] == "ans"
