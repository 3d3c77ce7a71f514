"""Every registered technique passes the shared contract."""

from __future__ import annotations

import pytest

from modelpress.registry import technique_names
from modelpress.testing import check_technique, tiny_convnet

# technique -> (params, min cosine, artifact must shrink, has targets)
CASES = {
    "prune.magnitude": ({"sparsity": 0.5}, 0.95, True, True),
    "quant.rtn": ({"bits": 4, "group_size": 16}, 0.98, True, True),
    "train": ({"max_steps": 5, "lr": 1e-4}, 0.98, False, False),
}


def test_every_technique_has_a_contract_case():
    assert sorted(CASES) == technique_names()


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract_on_mlp(name, mlp, digits):
    params, min_cos, smaller, targeted = CASES[name]
    report = check_technique(
        name,
        params,
        mlp,
        digits,
        inputs=digits.test.tensors[0][:64],
        min_cosine=min_cos,
        expect_smaller=smaller,
        targeted=targeted,
    )
    assert report["cosine"] >= min_cos


@pytest.mark.parametrize("name", ["prune.magnitude", "quant.rtn"])
def test_contract_on_convnet(name, digits):
    params, _, smaller, targeted = CASES[name]
    model = tiny_convnet()
    report = check_technique(
        name,
        params,
        model,
        digits,
        inputs=digits.test.tensors[0][:32],
        min_cosine=0.9,
        expect_smaller=smaller,
        targeted=targeted,
    )
    assert report["bytes_after"] < report["bytes_before"]
